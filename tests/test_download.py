"""vaelib._io.download: a download is cut off after the known size and given up at a total deadline."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from tests.test_data import leftovers, mnist_like
from vaelib.data import MNIST_FILES, load_mnist


class _Server:
    """A loopback HTTP server in a thread; ``handler(request)`` answers every GET."""

    def __init__(self, respond) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_is_cut_off_after_the_known_size(tmp_path):
    """A server that sends 64 MB for the 10,008-byte test labels: refused after about 74 kB."""
    sent = []

    def flood(request) -> None:
        request.send_response(200)
        request.end_headers()  # no Content-Length: only counting the bytes can stop it
        chunk = bytes(1 << 16)
        for _ in range(1024):
            request.wfile.write(chunk)
            sent.append(len(chunk))

    root = tmp_path / "root"
    mnist_like(root)
    (root / MNIST_FILES["test_labels"]).unlink()  # the one file to download
    with _Server(flood) as server, pytest.raises(OSError, match=r"t10k-labels.*sent more than the 75544 bytes"):
        load_mnist(root, download=True, mirrors=(server.url,), checksums=None)
    assert sum(sent) < 16 << 20 and leftovers(root) == []  # the client hung up (kernel buffers aside)


def test_download_has_a_total_deadline(tmp_path):
    """A server that trickles a byte every 0.1 s and then falls silent is given up at the deadline
    (2 s here), not after the file, nor a socket timeout after its last byte."""

    def trickle(request) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "10008")
        request.end_headers()
        for _ in range(18):
            request.wfile.write(b"\0")
            request.wfile.flush()
            time.sleep(0.1)
        time.sleep(8)  # then nothing, and it hangs up

    root = tmp_path / "root"
    mnist_like(root)
    (root / MNIST_FILES["test_labels"]).unlink()
    start = time.monotonic()
    with _Server(trickle) as server, pytest.raises(OSError, match=r"t10k-labels.*not complete after 2 s"):
        load_mnist(root, download=True, mirrors=(server.url,), checksums=None, timeout=2.0)
    assert time.monotonic() - start < 3.0
    assert leftovers(root) == []
