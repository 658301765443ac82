"""Data loading: IDX files good and bad, verified downloads, MNIST on small files, the digits."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import threading
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaelib import data
from vaelib.data import MNIST_FILES, ChecksumError, IDXError, load_mnist, read_idx


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding of a uint8 array of 1 (labels) or 3 (images) dimensions."""
    magic = magic if magic is not None else {1: 2049, 3: 2051}[array.ndim]
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes, *, compress: bool = True) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def mnist_like(root: Path, *, n_train: int = 6, n_test: int = 4, side: int = 28, seed: int = 0) -> dict[str, str]:
    """Write four small MNIST-shaped IDX gzip files into ``root``; return the SHA-256 of each, decompressed."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, side, side), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, side, side), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    sums = {}
    for key, name in MNIST_FILES.items():
        payload = idx_bytes(arrays[key])
        write(root / name, payload)
        sums[name] = hashlib.sha256(payload).hexdigest()
    return sums


def leftovers(folder: Path) -> list[str]:
    """Names of hidden temporary files (the ``.part`` files of downloads) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- read_idx on good files ---------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    """Images and labels come back with their shape and bytes, gzipped or not."""
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1, 255], dtype=np.uint8)
    got = read_idx(write(tmp_path / "i", idx_bytes(images), compress=compress))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and np.array_equal(got, images)
    assert np.array_equal(read_idx(write(tmp_path / "l", idx_bytes(labels), compress=compress)), labels)


def test_read_idx_accepts_the_right_checksum(tmp_path):
    """A matching SHA-256 of the decompressed bytes passes."""
    payload = idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))
    path = write(tmp_path / "ok.gz", payload)
    assert read_idx(path, sha256=hashlib.sha256(payload).hexdigest()).shape == (3, 2, 2)


# -- read_idx on bad files ----------------------------------------------------------------


def test_wrong_magic_number(tmp_path):
    """A magic number other than 2049 or 2051 is refused and named."""
    path = write(tmp_path / "x.gz", idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8), magic=2052))
    with pytest.raises(IDXError, match=r"x\.gz: wrong magic number 2052"):
        read_idx(path)


def test_header_claiming_a_billion_images_is_refused_before_allocating(tmp_path):
    """The claimed size is checked against the limit from the header alone: peak memory stays tiny."""
    header = struct.pack(">IIII", 2051, 1_000_000_000, 28, 28)  # 784 GB of pixels
    path = write(tmp_path / "huge.gz", header + bytes(4_000_000))  # and 4 MB of them present
    tracemalloc.start()
    try:
        with pytest.raises(IDXError, match=r"huge\.gz: header claims shape \(1000000000, 28, 28\)"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"peak allocation {peak} bytes while refusing the file"


def test_size_limit_counts_the_claimed_size(tmp_path):
    """A file within the limit reads; the same file is refused with a smaller max_bytes."""
    path = write(tmp_path / "x.gz", idx_bytes(np.zeros((10, 10, 10), dtype=np.uint8)))
    assert read_idx(path, max_bytes=1016).shape == (10, 10, 10)
    with pytest.raises(IDXError, match="more than the 1015 bytes allowed"):
        read_idx(path, max_bytes=1015)


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_payload(tmp_path, compress):
    """Fewer data bytes than the header claims is an error, not a short array."""
    payload = idx_bytes(np.ones((4, 5, 5), dtype=np.uint8))[:-7]
    with pytest.raises(IDXError, match=r"claims shape \(4, 5, 5\) \(100 bytes of data\), but 93 bytes follow"):
        read_idx(write(tmp_path / "t", payload, compress=compress))


def test_trailing_bytes(tmp_path):
    """More data than the header claims is an error too."""
    payload = idx_bytes(np.ones(5, dtype=np.uint8)) + b"\x00"
    with pytest.raises(IDXError, match="but more bytes follow"):
        read_idx(write(tmp_path / "t.gz", payload))


def test_header_cut_off(tmp_path):
    """A file that ends inside its header."""
    with pytest.raises(IDXError, match="header cut off"):
        read_idx(write(tmp_path / "h.gz", struct.pack(">III", 2051, 1, 28)))
    with pytest.raises(IDXError, match="too short for an IDX header"):
        read_idx(write(tmp_path / "s.gz", b"\x00\x00\x08"))


def test_truncated_gzip_stream(tmp_path):
    """A gzip file cut short, even only in its trailer, is refused."""
    full = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    for cut in (len(full) // 2, len(full) - 4):
        path = tmp_path / f"cut{cut}.gz"
        path.write_bytes(full[:cut])
        with pytest.raises(IDXError, match="not a readable gzip file"):
            read_idx(path)


def test_gzip_garbage(tmp_path):
    """The gzip magic followed by noise."""
    path = tmp_path / "garbage.gz"
    path.write_bytes(b"\x1f\x8b" + np.random.default_rng(0).bytes(500))
    with pytest.raises(IDXError, match=r"garbage\.gz: not a readable gzip file"):
        read_idx(path)


def test_checksum_mismatch(tmp_path):
    """A well-formed file with other content fails its SHA-256 and is named."""
    path = write(tmp_path / "x.gz", idx_bytes(np.zeros(3, dtype=np.uint8)))
    expected = hashlib.sha256(idx_bytes(np.ones(3, dtype=np.uint8))).hexdigest()
    with pytest.raises(ChecksumError, match=rf"x\.gz: SHA-256 of the decompressed bytes is \w+, expected {expected}"):
        read_idx(path, sha256=expected)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing.gz")


_FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),  # a hang fails here
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


@_FUZZ
@given(blob=st.binary(max_size=600), compress=st.booleans(), sha=st.booleans())
def test_fuzz_random_bytes(blob, compress, sha):
    """Random bytes, raw or gzip-wrapped: an array or one of the documented errors, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "f", blob, compress=compress)
        try:
            out = read_idx(path, max_bytes=4096, sha256="0" * 64 if sha else None)
        except (IDXError, ChecksumError):
            return
        assert not sha  # no digest is all zeros
        assert out.dtype == np.uint8 and out.ndim in (1, 3)


@_FUZZ
@given(
    magic=st.sampled_from([2049, 2051, 2050, 0, 0xFFFFFFFF]),
    dims=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), min_size=3, max_size=3),
    extra=st.integers(-3, 3),
    compress=st.booleans(),
)
def test_fuzz_headers(magic, dims, extra, compress):
    """Plausible headers with huge or small sizes and payloads a little off: read exactly when consistent."""
    ndim = {2049: 1, 2051: 3}.get(magic, 3)
    header = struct.pack(f">I{ndim}I", magic, *dims[:ndim])
    size = int(np.prod(dims[:ndim], dtype=object))
    body = bytes(min(max(size + extra, 0), 5000))
    consistent = magic in (2049, 2051) and len(body) == size and len(header) + size <= 6000
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "f", header + body, compress=compress)
        try:
            out = read_idx(path, max_bytes=6000)
        except IDXError:
            assert not consistent
            return
        assert consistent and out.shape == tuple(dims[:ndim])


# -- downloads ----------------------------------------------------------------------------


def test_download_from_a_file_url(tmp_path):
    """A good mirror: files are fetched, verified and kept under their names; no temporary files stay."""
    sums = mnist_like(tmp_path / "mirror")
    root = tmp_path / "root"
    train_x, test_x = load_mnist(root, download=True, checksums=sums, mirrors=((tmp_path / "mirror").as_uri() + "/",))
    assert train_x.shape == (6, 784) and test_x.shape == (4, 784)
    assert sorted(p.name for p in root.iterdir()) == sorted(MNIST_FILES.values())


@pytest.mark.parametrize("damage", ["checksum", "truncated", "missing"])
def test_failed_download_leaves_nothing(tmp_path, damage):
    """A bad, cut-off or absent file on the mirror: an error, and no file or temporary file in root."""
    sums = mnist_like(tmp_path / "mirror")
    target = tmp_path / "mirror" / MNIST_FILES["train_images"]
    if damage == "checksum":
        sums[target.name] = hashlib.sha256(b"something else").hexdigest()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    else:
        target.unlink()
    root = tmp_path / "root"
    with pytest.raises(OSError, match=r"could not download a good copy of train-images-idx3-ubyte\.gz"):
        load_mnist(root, download=True, checksums=sums, mirrors=((tmp_path / "mirror").as_uri() + "/",))
    assert not (root / target.name).exists()
    assert leftovers(root) == []


def test_download_falls_back_to_the_next_mirror(tmp_path):
    """A damaged first mirror is skipped for a good second one."""
    sums = mnist_like(tmp_path / "good")
    mnist_like(tmp_path / "bad", seed=1)  # well-formed files with other content
    mirrors = ((tmp_path / "bad").as_uri() + "/", (tmp_path / "good").as_uri() + "/")
    train_x, _ = load_mnist(tmp_path / "root", download=True, checksums=sums, mirrors=mirrors)
    expected, _ = load_mnist(tmp_path / "good", checksums=sums)
    assert torch.equal(train_x, expected)
    assert leftovers(tmp_path / "root") == []


# -- load_mnist and load_digits -----------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_load_mnist_small_files(tmp_path, verify):
    """Four small valid files: float32 rows in [0, 1], labels alongside, with and without checksums."""
    sums = mnist_like(tmp_path, n_train=6, n_test=4)
    train_x, train_y, test_x, test_y = load_mnist(tmp_path, checksums=sums if verify else None, with_labels=True)
    assert train_x.shape == (6, 784) and test_x.shape == (4, 784)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64 and test_y.shape == (4,)
    for x in (train_x, test_x):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    raw = read_idx(tmp_path / MNIST_FILES["train_images"])
    assert torch.equal(train_x, torch.from_numpy(raw.reshape(6, -1) / 255.0).float())


def test_load_mnist_checks_the_checksums(tmp_path):
    """A file that does not match the given SHA-256 is refused."""
    sums = mnist_like(tmp_path)
    sums[MNIST_FILES["test_labels"]] = "0" * 64
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_mnist(tmp_path, checksums=sums)


def test_load_mnist_wrong_image_shape(tmp_path):
    """Images of 10 x 10 pixels are not MNIST."""
    sums = mnist_like(tmp_path, side=10)
    with pytest.raises(IDXError, match=r"expected images of 28 x 28, got \(6, 10, 10\)"):
        load_mnist(tmp_path, checksums=sums)


def test_load_mnist_label_count(tmp_path):
    """Labels must match the images one to one."""
    mnist_like(tmp_path)
    write(tmp_path / MNIST_FILES["test_labels"], idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(
        IDXError, match=r"t10k-images-idx3-ubyte\.gz holds 4 images but .*t10k-labels-idx1-ubyte\.gz holds 3"
    ):
        load_mnist(tmp_path, checksums=None)


def test_load_mnist_missing_file_and_checksum(tmp_path):
    """A missing file without download, and a checksum table that lacks a file."""
    sums = mnist_like(tmp_path)
    with pytest.raises(ValueError, match="checksums: expected a SHA-256 for each of the four files"):
        load_mnist(tmp_path, checksums={k: v for k, v in sums.items() if "t10k" not in k})
    (tmp_path / MNIST_FILES["test_images"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz: missing; pass download=True"):
        load_mnist(tmp_path, checksums=sums)


def test_load_digits():
    """The embedded digits: a fixed split of float32 rows in [0, 1]."""
    train_x, train_y, test_x, test_y = data.load_digits(with_labels=True)
    assert train_x.shape == (1500, 64) and test_x.shape == (297, 64)
    assert train_y.shape == (1500,) and test_y.shape == (297,)
    assert float(train_x.min()) >= 0.0 and float(train_x.max()) <= 1.0
    assert torch.equal(data.load_digits()[1], test_x)


# -- dynamic binarization -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binarize_draws_bernoulli_pixels(dtype):
    """Each pixel is 1 with probability equal to its intensity: the frequency over 100,000 draws of
    every intensity lies within 4 standard errors of it, 0 and 1 stay put, and pixels are independent."""
    p = torch.tensor([0.0, 0.003, 0.1, 0.25, 0.5, 0.77, 0.999, 1.0], dtype=dtype)
    n = 100_000
    x = data.binarize(p.expand(n, -1), generator=torch.Generator().manual_seed(0))  # (n, 8)
    assert x.dtype == dtype and x.shape == (n, 8)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    freq = x.double().mean(0)
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert torch.all((freq - p.double()).abs() <= 4 * se), (freq, p)
    assert freq[0] == 0 and freq[-1] == 1
    # Neighbouring pixels at p = 0.5 and 0.25: both on with probability 0.125.
    both = (x[:, 3] * x[:, 4]).double().mean()
    assert abs(both - 0.125) <= 4 * math.sqrt(0.125 * 0.875 / n)


def test_binarize_repeats_with_a_generator_and_refuses_bad_intensities():
    """The same generator seed gives the same draw; values outside [0, 1] or NaN are refused."""
    x = torch.rand(50, 64)
    a = data.binarize(x, generator=torch.Generator().manual_seed(3))
    b = data.binarize(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, data.binarize(x, generator=torch.Generator().manual_seed(4)))
    for bad in (x * 2, x - 1, torch.full((2, 2), float("nan"))):
        with pytest.raises(ValueError, match=r"x: binarize needs finite values in \[0, 1\]"):
            data.binarize(bad)
    with pytest.raises(TypeError, match=r"x: expected a torch\.Tensor"):
        data.binarize(x.numpy())


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
