"""Faults tried as a careless user and as an attacker would: runs started twice, crafted
checkpoints, a full disk, odd arguments, hostile download servers, signals.

Each test fails if its guarantee (README, "Reliability") is broken.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import vaelib
from tests.test_data import leftovers, mnist_like
from vaelib._io.atomic import WriteError, remove_stale_temporaries
from vaelib._io.lock import RunLocked, exclusive
from vaelib.cli import main
from vaelib.data import MNIST_FILES, IDXError, load_mnist, read_idx
from vaelib.training.model_file import CheckpointError, atomic_save, read_checkpoint

X_DIM = 64
TINY = ["--hidden", "8", "--z-dim", "2", "--test-k", "2", "--batch-size", "500"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return vaelib.data.load_digits()[0][:300]


def tiny(activation: str = "tanh", seed: int = 0) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=(8,), activation=activation)


def run(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def one_line_error(capsys) -> str:
    """The single stderr line of a failed command (no traceback)."""
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A finished two-epoch CLI run."""
    out = tmp_path / "run"
    assert run(["train", *TINY, "--epochs", "2", "--out", out]) == 0
    return out


# -- 1. two runs, one folder ----------------------------------------------------------------

# Holds the lock until told to stop; loads vaelib/_io/lock.py alone, so it starts without importing torch.
HOLD_LOCK = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_lock", {vaelib._io.lock.__file__!r})
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
with lock.exclusive(sys.argv[1], "test"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_second_run_into_a_locked_folder_is_refused_with_the_holders_pid(tmp_path, capsys, digits):
    """While a live process holds the run's lock, train and fit are refused naming its pid; once it
    is killed (SIGKILL: no clean-up), its stale lock is taken over."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".checkpoint.pt.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert run(["train", *TINY, "--epochs", "1", "--out", out]) == 2
        assert f"in use by another run (pid {holder.pid})" in one_line_error(capsys)
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            vaelib.fit(tiny(), digits, epochs=1, checkpoint=out / "checkpoint.pt", progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".checkpoint.pt.lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait(30)
    assert run(["train", *TINY, "--epochs", "1", "--out", out]) == 0
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / ".checkpoint.pt.lock").exists()  # released and removed on exit


def test_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    """A second holder in another process is refused; fit inside the command line's lock is not."""
    lock = tmp_path / ".lock"
    with exclusive(lock, "the folder"):
        with exclusive(lock, "the folder"):  # the same process: a no-op
            pass
        probe = subprocess.run(
            [sys.executable, "-c", HOLD_LOCK, str(lock)], input="\n", capture_output=True, text=True, env=ENV
        )
        assert probe.returncode != 0 and f"in use by another run (pid {os.getpid()})" in probe.stderr
    assert not lock.exists()


def test_clean_up_removes_only_temporaries_of_dead_writers(tmp_path):
    """A temporary named with a live pid belongs to a write in progress and stays; dead ones go."""
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    names = [
        f".checkpoint.pt.{live.pid}.0a1b2c3d.tmp",
        f".checkpoint.pt.{dead.pid}.0a1b2c3d.tmp",
        ".checkpoint.pt.k2j3h4_x.tmp",  # an older writer's name, without a pid
    ]
    try:
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        removed = remove_stale_temporaries(tmp_path, ("checkpoint.pt",))
        assert sorted(p.name for p in removed) == sorted(names[1:])
        assert temporaries(tmp_path) == [names[0]]
    finally:
        live.kill()
        live.wait(30)


# -- 2. fit(checkpoint=...) without resume ---------------------------------------------------


def test_fit_refuses_to_replace_a_checkpoint_without_resume_or_overwrite(tmp_path, digits):
    path = tmp_path / "checkpoint.pt"
    vaelib.fit(tiny(), digits, epochs=2, checkpoint=path, progress=False)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"^checkpoint: .* already exists; pass resume=True .* overwrite=True"):
        vaelib.fit(tiny(), digits, epochs=1, checkpoint=path, progress=False)
    assert path.read_bytes() == before
    vaelib.fit(tiny(), digits, epochs=1, checkpoint=path, overwrite=True, progress=False)
    assert read_checkpoint(path)["epoch"] == 1


# -- 3. other files in --out -----------------------------------------------------------------


def test_out_must_be_a_run_a_new_folder_or_an_empty_one(tmp_path, capsys):
    """An empty --out and a folder of other files are refused and left untouched."""
    assert run(["train", *TINY, "--epochs", "1", "--out", ""]) == 2
    assert "--out: expected a folder name" in one_line_error(capsys)
    for name in ("notes.txt", "metrics.json"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text("mine")
        for resume in ([], ["--resume"]):
            assert run(["train", *TINY, "--epochs", "1", "--out", folder, *resume]) == 2
            assert f"not empty and not a run of 'vaelib train' (it holds {name})" in one_line_error(capsys)
        assert sorted(p.name for p in folder.iterdir()) == [name] and (folder / name).read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["train", *TINY, "--epochs", "1", "--out", empty]) == 0


# -- 4. hostile checkpoints ------------------------------------------------------------------

MEASURE = """
import resource, sys
import vaelib
from vaelib.training.model_file import CheckpointError
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
for path in sys.argv[1:]:
    before = peak()
    try:
        vaelib.load(path)
        outcome = "loaded"
    except CheckpointError as err:
        outcome = str(err)
    print(peak() - before, outcome, flush=True)
"""


def _inflating_copy(good: Path, bad: Path, inflated: int) -> None:
    """``good`` with its data.pkl deflated and padded with zeros to ``inflated`` bytes: a zip bomb."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if not info.filename.endswith("/data.pkl"):
                dst.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
                continue
            with dst.open(info.filename, "w", force_zip64=True) as f:
                f.write(data)
                zeros = bytes(1 << 20)
                for _ in range((inflated - len(data)) >> 20):
                    f.write(zeros)


@pytest.mark.slow
def test_crafted_checkpoints_are_refused_in_bounded_memory(tmp_path, digits):
    """A recorded architecture of 742 MB or of 10**12 units, and a 256 MB zip bomb, each in a file of
    kilobytes: refused with CheckpointError, and loading them raises the peak memory by under 40 MB."""
    good = tmp_path / "good.pt"
    vaelib.fit(tiny(), digits, epochs=1, checkpoint=good, progress=False)
    files = {}
    for name, hidden in (("wide", [1_000_000]), ("huge", [10**12])):
        obj = read_checkpoint(good)
        obj["model"]["config"]["hidden"] = hidden
        files[name] = atomic_save(obj, tmp_path / f"{name}.pt")
    files["bomb"] = tmp_path / "bomb.pt"
    _inflating_copy(good, files["bomb"], 256 << 20)
    assert all(p.stat().st_size < 1 << 20 for p in files.values()), {n: p.stat().st_size for n, p in files.items()}
    with pytest.raises(CheckpointError, match="do not fit the recorded architecture"):
        read_checkpoint(files["wide"])  # refused before torch.load reads the tensors, not only by load
    child = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, files.values())], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert child.returncode == 0, child.stderr[-2000:]
    results = dict(zip(files, child.stdout.splitlines(), strict=True))
    expected = {
        "wide": "the weights do not fit the recorded architecture",
        "huge": "the recorded architecture is invalid: hidden, z_dim: .* more than the 268,435,456 allowed",
        "bomb": "is compressed",
    }
    for name, line in results.items():
        grown, message = line.split(" ", 1)
        assert message.startswith(f"{files[name]}: "), line
        assert re.search(expected[name], message), line
        assert int(grown) < 40 << 20, f"{name}: peak memory grew by {int(grown) >> 20} MB"


def test_tensor_reaching_outside_its_storage_is_refused(tmp_path, digits):
    """A pickle that claims more elements than its storage member holds is refused before reading."""
    good = tmp_path / "good.pt"
    vaelib.save(tiny(), good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data/0"):
                data = data[:4]  # the member shrinks; the pickle still claims the full storage
            dst.writestr(info.filename, data)
    with pytest.raises(CheckpointError, match=r"storage 0 should hold \d+ bytes, but its member .* holds 4 bytes"):
        vaelib.load(bad)


# -- 5. a full disk --------------------------------------------------------------------------


class _FullDisk:
    """Stands for a file system that fills up: file writes fail with ENOSPC once armed."""

    def __init__(self, monkeypatch, after: int) -> None:
        self.calls, self.after, real = 0, after, os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real(fd, *args, **kwargs)
            self.calls += 1
            if self.calls <= self.after:
                return f
            f.close()
            fd2 = os.open(os.devnull, os.O_WRONLY)
            broken = real(fd2, "wb")

            def write(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            broken.write = write
            return broken

        monkeypatch.setattr(vaelib._io.atomic.os, "fdopen", fdopen)


def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, digits):
    path = tmp_path / "checkpoint.pt"
    _FullDisk(monkeypatch, after=1)  # the first checkpoint is written, the second is not
    with pytest.raises(WriteError) as err:
        vaelib.fit(tiny(), digits, epochs=3, checkpoint=path, progress=False)
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "\n" not in message
    assert message == f"{path}: could not be written (no space left on the device); the previous checkpoint is intact"
    assert read_checkpoint(path)["epoch"] == 1 and temporaries(tmp_path) == []


def test_full_disk_in_the_command_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _FullDisk(monkeypatch, after=2)  # run.json and the first checkpoint
    assert run(["train", *TINY, "--epochs", "3", "--out", out]) == 2
    monkeypatch.undo()
    err = one_line_error(capsys)
    assert f"{out / 'checkpoint.pt'}: could not be written (no space left on the device)" in err
    assert err.endswith("the previous checkpoint is intact\n")
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and temporaries(out) == []


FSIZE = """
import os, resource, signal, sys
from vaelib.cli import main
out = sys.argv[1]
args = ["train", "--hidden", "64", "--z-dim", "2", "--test-k", "2", "--batch-size", "500", "--out", out]
assert main([*args, "--epochs", "1"]) == 0
# The kernel now refuses to grow any file past 4 kB (run.json fits; the checkpoint's 16 kB
# weight matrices do not): a real failing write, inside torch's writer if it wrote to the file.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
sys.exit(main([*args, "--epochs", "2", "--resume"]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_a_write_the_kernel_refuses_is_one_line_in_the_command_line(tmp_path):
    """With a file size limit (RLIMIT_FSIZE), torch's own writer would fail inside its zip writer
    ("unexpected pos"); the archive is built in memory, so the write fails as one clear line."""
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", FSIZE, str(out)], capture_output=True, text=True, env=ENV)
    assert child.returncode == 2, child.stderr[-2000:]
    expected = f"{out / 'checkpoint.pt'}: could not be written (File too large); the previous checkpoint is intact"
    assert child.stderr == f"vaelib train: error: {expected}\n"
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and temporaries(out) == []


# -- 6, 7. resume with another configuration; run.json only after every check --------------


def test_resume_with_another_activation_is_refused(tmp_path, digits):
    path = tmp_path / "checkpoint.pt"
    vaelib.fit(tiny("tanh"), digits, epochs=1, checkpoint=path, progress=False)
    relu = tiny("relu")
    before = {k: v.clone() for k, v in relu.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"another architecture \(saved, now\): \{'activation': \('tanh', 'relu'\)"
    ):
        vaelib.fit(relu, digits, epochs=2, checkpoint=path, resume=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in relu.state_dict().items())


def test_refused_resume_leaves_run_json_as_it_was(run_folder, capsys):
    """Without run.json the checkpoint's architecture is still compared; a refused resume writes nothing,
    so the right resume then succeeds."""
    (run_folder / "run.json").unlink()
    assert run(["train", *TINY, "--activation", "relu", "--epochs", "3", "--out", run_folder, "--resume"]) == 2
    assert "another architecture" in one_line_error(capsys) and not (run_folder / "run.json").exists()
    assert run(["train", *TINY, "--epochs", "3", "--out", run_folder, "--resume"]) == 0
    before = (run_folder / "run.json").read_bytes()
    assert run(["train", *TINY, "--epochs", "1", "--out", run_folder, "--resume"]) == 2  # fewer epochs
    assert "already holds 3 epochs" in one_line_error(capsys)
    assert (run_folder / "run.json").read_bytes() == before
    assert run(["train", *TINY, "--epochs", "3", "--out", run_folder, "--resume"]) == 0


# -- 8. NaN and infinite weights ---------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path, digits, value, capsys):
    path = tmp_path / "run" / "checkpoint.pt"
    vaelib.fit(tiny(), digits, epochs=1, checkpoint=path, progress=False)
    obj = read_checkpoint(path)
    obj["model"]["state_dict"]["decoder.0.weight"][0, 0] = value
    atomic_save(obj, path)
    pattern = rf"^{re.escape(str(path))}: holds NaN or infinite values \(model\.state_dict\.decoder\.0\.weight\)"
    with pytest.raises(CheckpointError, match=pattern):
        vaelib.load(path)
    with pytest.raises(CheckpointError, match=pattern):
        vaelib.fit(tiny(), digits, epochs=2, checkpoint=path, resume=True, progress=False)
    (path.parent / "run.json").write_text(json.dumps({"format": "vaelib-run", "data": "digits", "seed": 0}))
    assert run(["evaluate", path.parent, "--k", "2"]) == 2
    assert "holds NaN or infinite values" in one_line_error(capsys)


# -- 9. arguments that slipped through ---------------------------------------------------------


class _Empty(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., :2], x[..., :2]], dim=-1)


class _EmptyDecoder(torch.nn.Module):
    """A decoder of the right output shape, (N, X_DIM) logits, with no parameters."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[..., :1].expand(*z.shape[:-1], X_DIM)


FIT_CASES = {
    "seed str": ({"seed": "7"}, TypeError, r"^seed: expected an integer"),
    "seed None": ({"seed": None}, TypeError, r"^seed: expected an integer"),
    "seed float": ({"seed": 1.5}, TypeError, r"^seed: expected an integer"),
    "seed 65 bits": ({"seed": 2**64}, ValueError, r"^seed: expected an integer in \[0, 2\*\*64 - 1\]"),
    "seed negative": ({"seed": -1}, ValueError, r"^seed: expected an integer in"),
    "analytic iwae": ({"objective": "iwae", "analytic_kl": True}, ValueError, r"^analytic_kl: .*'elbo' only"),
    "analytic str": ({"analytic_kl": "no"}, TypeError, r"^analytic_kl: expected True or False, got 'no'"),
    "resume str": ({"resume": "yes"}, TypeError, r"^resume: expected True or False"),
    "callback": ({"callback": 3}, TypeError, r"^callback: expected a function"),
    "grad data": ({"train_x": "grad"}, ValueError, r"^train_x: expected data that do not require grad"),
    "no parameters": ({"vae": "empty"}, ValueError, r"^vae: the model has no trainable parameters"),
}


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_refuses_bad_arguments_before_any_work(case, tmp_path, digits):
    kwargs, error, message = FIT_CASES[case]
    kwargs = dict(kwargs)
    vae = tiny()
    if kwargs.pop("vae", None) == "empty":
        vae = vaelib.VAE(_Empty(), _EmptyDecoder(), x_dim=X_DIM, z_dim=2)
    x = digits.clone().requires_grad_(True) if kwargs.pop("train_x", None) == "grad" else digits
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(error, match=message):
        vaelib.fit(vae, x, epochs=1, checkpoint=tmp_path / "c.pt", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == [] and x.grad is None
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_load_refuses_devices_this_machine_lacks(tmp_path):
    path = vaelib.save(tiny(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"^device: expected 'auto', 'cpu', 'cuda' or 'mps', got 'tpu'"):
        vaelib.load(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda' was asked for, but CUDA is not available"):
            vaelib.load(path, device="cuda")


@pytest.mark.parametrize("method", ["elbo", "iwae"])
def test_bounds_refuse_data_of_another_dtype(method):
    vae = tiny()
    with pytest.raises(TypeError, match=r"^x: expected torch\.float32 data \(the model's dtype\), got torch\.float64"):
        getattr(vae, method)(torch.rand(3, X_DIM, dtype=torch.float64), k=2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", str(2**64)], r"argument --seed: expected an integer in \[0, 18446744073709551615\]"),
        (["--hidden", str(10**12)], r"--hidden, --z-dim: .* more than the 268,435,456 allowed"),
        (["--z-dim", str(10**9)], r"--hidden, --z-dim: .* more than the 268,435,456 allowed"),
    ],
)
def test_cli_refuses_huge_arguments_and_writes_nothing(argv, message, tmp_path, capsys):
    assert run(["train", *argv, "--out", tmp_path / "new"]) == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "new").exists()


# -- 10. downloads -------------------------------------------------------------------------------


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


# -- 11. smaller ---------------------------------------------------------------------------------


def test_interrupt_during_a_checkpoint_write_rolls_back_that_epoch(tmp_path, monkeypatch, digits, capsys):
    """Ctrl-C inside epoch 2's checkpoint write: the history, the model and the message say epoch 1,
    which is what the checkpoint on disk holds."""
    real, calls = vaelib.train.write_training_checkpoint, [0]

    def write(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vaelib.train, "write_training_checkpoint", write)
    path = tmp_path / "checkpoint.pt"
    vae = tiny()
    with pytest.warns(UserWarning, match="interrupted during epoch 2; the model is as it was after epoch 1"):
        history = vaelib.fit(vae, digits, epochs=3, checkpoint=path, progress=False)
    assert history.interrupted and history.epoch == [1]
    saved = vaelib.load(path)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), vae.state_dict().values(), strict=True))
    calls[0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(["train", *TINY, "--epochs", "3", "--out", tmp_path / "cli"]) == 130
    assert capsys.readouterr().err.endswith("interrupted after epoch 1; add --resume to continue\n")
    assert read_checkpoint(tmp_path / "cli" / "checkpoint.pt")["epoch"] == 1


def test_zero_epochs_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *TINY, "--epochs", "0", "--out", out]) == 0
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 0 and (out / "metrics.json").exists()
    assert run(["evaluate", out, "--k", "2"]) == 0
    assert run(["train", *TINY, "--epochs", "1", "--out", out, "--resume"]) == 0
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_resume_asking_for_fewer_epochs_than_done_is_refused(run_folder, capsys):
    before = {p.name: p.read_bytes() for p in run_folder.iterdir()}
    assert run(["train", *TINY, "--epochs", "1", "--out", run_folder, "--resume"]) == 2
    assert "epochs: " in (err := one_line_error(capsys)) and "already holds 2 epochs, more than the 1 asked for" in err
    assert {p.name: p.read_bytes() for p in run_folder.iterdir()} == before


def test_a_folder_named_like_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoint.pt"
    folder.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: a folder, not a checkpoint file"):
        vaelib.load(folder)
    assert run(["evaluate", tmp_path / "run"]) == 2
    assert "checkpoint.pt: a folder, not a checkpoint file" in one_line_error(capsys)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", 1)], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_is_handled_like_ctrl_c(tmp_path, signum):
    """SIGTERM (SIGHUP) mid-run: a message, exit status 143 (129), and a checkpoint at the last full epoch."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vaelib", "train", *TINY, "--batch-size", "100", "--epochs", "500", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().startswith("epoch 1/500")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    done = read_checkpoint(out / "checkpoint.pt")["epoch"]
    assert err == f"vaelib train: stopped by {name} after epoch {done}; add --resume to continue\n"
    assert 1 <= done < 500 and temporaries(out) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_as_a_data_file_is_refused_at_once(tmp_path):
    fifo = tmp_path / "train-images-idx3-ubyte.gz"
    os.mkfifo(fifo)
    result = []

    def read() -> None:
        try:
            read_idx(fifo)
        except IDXError as err:
            result.append(str(err))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_idx blocked on a FIFO"
    assert result and "not a regular file" in result[0]


def test_swapped_image_files_name_both_files(tmp_path):
    mnist_like(tmp_path)
    train, test = tmp_path / MNIST_FILES["train_images"], tmp_path / MNIST_FILES["test_images"]
    train_bytes = train.read_bytes()
    train.write_bytes(test.read_bytes())
    test.write_bytes(train_bytes)
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte\.gz holds 4 images but .*train-labels.* 6 labels"):
        load_mnist(tmp_path, checksums=None)


def test_importing_vaelib_leaves_the_umask_alone(tmp_path):
    """The umask is process-wide: reading it at import (set, then restore) races with threads."""
    probe = textwrap.dedent(
        """
        import os
        calls = []
        real = os.umask
        os.umask = lambda mask: calls.append(mask) or real(mask)
        import vaelib
        vaelib.save(vaelib.VAE.mlp(4, 2, hidden=(3,)), os.path.join(os.environ["OUT"], "m.pt"))
        print(calls)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**ENV, "OUT": str(tmp_path)}
    )
    assert child.returncode == 0 and child.stdout == "[]\n", child.stderr[-2000:]
