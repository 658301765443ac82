"""Data sets: the embedded 8x8 digits, MNIST from IDX files, dynamic binarization.

The digits (1,797 images of 8x8 pixels from scikit-learn, originally the UCI
"Optical Recognition of Handwritten Digits" set) ship inside the package, so
the book runs with no network. MNIST is read from the four standard IDX gzip
files, whose decompressed bytes are checked against their published SHA-256
before use.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import stat
import struct
import tempfile
import zlib
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from vaelib._io.download import fetch

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "MNIST_SHA256",
    "ChecksumError",
    "IDXError",
    "bernoulli_draw",
    "binarize",
    "load_digits",
    "load_mnist",
    "read_idx",
]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# SHA-256 of the decompressed files (the .gz wrappers differ between mirrors).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# IDX magic numbers: 0x0000 then the type code 0x08 (unsigned byte) and the number of dimensions.
_IDX_MAGIC = {2049: 1, 2051: 3}
# No standard IDX file is larger than this once decompressed (60000 x 28 x 28 + header).
MAX_IDX_BYTES = 64 * 1024 * 1024
# Decompressed sizes of the four MNIST files: a download (gzip or not) never needs more than
# this plus DOWNLOAD_MARGIN bytes, so a server sending more is cut off there.
MNIST_BYTES = {
    "train-images-idx3-ubyte.gz": 47_040_016,
    "train-labels-idx1-ubyte.gz": 60_008,
    "t10k-images-idx3-ubyte.gz": 7_840_016,
    "t10k-labels-idx1-ubyte.gz": 10_008,
}
DOWNLOAD_MARGIN = 64 * 1024
# Seconds allowed for one file's whole download (connection included), unless told otherwise.
DOWNLOAD_TIMEOUT = 60.0


class IDXError(ValueError):
    """A file that is not a well-formed IDX file of the expected kind."""


class ChecksumError(ValueError):
    """A file whose decompressed bytes do not have the published SHA-256."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    return stream.read(n) if n > 0 else b""


def _read_bounded(path: Path, max_bytes: int) -> tuple[bytes, tuple[int, ...], int]:
    """The decompressed bytes of an IDX file, its shape and header size, checked as they are read.

    The header is read and checked first, so a file that claims more than
    ``max_bytes`` (a billion images, say) is refused before its payload is
    decompressed or any buffer of the claimed size is allocated.
    """
    # O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; only regular files are read.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IDXError(f"{path}: not a regular file (a folder, FIFO or device); expected an IDX file")
    with os.fdopen(fd, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        try:
            data = _read_exact(stream, 8)
            if len(data) < 8:
                raise IDXError(f"{path}: too short for an IDX header ({len(data)} bytes)")
            (magic,) = struct.unpack(">I", data[:4])
            if magic not in _IDX_MAGIC:
                raise IDXError(f"{path}: wrong magic number {magic} (expected 2049 for labels or 2051 for images)")
            ndim = _IDX_MAGIC[magic]
            header = 4 + 4 * ndim
            data += _read_exact(stream, header - 8)
            if len(data) < header:
                raise IDXError(f"{path}: header cut off ({len(data)} bytes, expected {header})")
            shape = struct.unpack(f">{ndim}I", data[4:header])
            size = math.prod(shape)  # exact Python integers: no overflow
            if header + size > max_bytes:
                raise IDXError(
                    f"{path}: header claims shape {shape} ({size} bytes of data), more than the "
                    f"{max_bytes} bytes allowed; refused before reading it"
                )
            data += _read_exact(stream, size + 1)  # one byte more, to notice trailing data
        except (OSError, EOFError, zlib.error) as err:
            raise IDXError(f"{path}: not a readable gzip file ({err})") from err
    if len(data) != header + size:
        follows = len(data) - header if len(data) <= header + size else "more"
        raise IDXError(
            f"{path}: header claims shape {shape} ({size} bytes of data), "
            f"but {follows} bytes follow it (truncated or corrupt)"
        )
    return data, shape, header


def read_idx(path: str | os.PathLike[str], *, sha256: str | None = None, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a uint8 array.

    The format (LeCun et al., "The MNIST database"): a big-endian header, the
    magic number 2049 (labels, 1 dimension) or 2051 (images, 3 dimensions),
    each dimension's size as a 32-bit integer, then one unsigned byte per entry.

    Parameters
    ----------
    path : path-like
    sha256 : str, optional
        Expected SHA-256 of the decompressed bytes; checked before the array is built.
    max_bytes : int
        Refuse files that decompress, or whose header claims they decompress,
        to more than this; the header is checked before the payload is read.

    Returns
    -------
    numpy.ndarray of uint8, shape (n,) for labels or (n, rows, cols) for images

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    IDXError
        Unreadable gzip, wrong magic number, a header that disagrees with the
        data, or a claimed size above ``max_bytes``.
    ChecksumError
        If ``sha256`` is given and does not match.
    """
    path = Path(path)
    data, shape, header = _read_bounded(path, max_bytes)
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ChecksumError(
                f"{path}: SHA-256 of the decompressed bytes is {digest}, expected {sha256}; "
                "the file is damaged or not the published one (delete it and download again)"
            )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _download(
    name: str, root: Path, mirrors: tuple[str, ...], sha256: str | None, timeout: float = DOWNLOAD_TIMEOUT
) -> None:
    """Fetch ``name`` into ``root`` atomically: a temporary file, verified, then renamed.

    Each attempt may take at most ``timeout`` seconds and ``MNIST_BYTES[name] +
    DOWNLOAD_MARGIN`` bytes (``MAX_IDX_BYTES`` for other names).
    """
    max_bytes = MNIST_BYTES.get(name, MAX_IDX_BYTES) + DOWNLOAD_MARGIN
    errors = []
    for mirror in mirrors:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=root)
        try:
            with os.fdopen(fd, "wb") as out:
                fetch(mirror + name, out, max_bytes, timeout)
            read_idx(tmp, sha256=sha256)  # verify before it takes the final name
            os.replace(tmp, root / name)
            return
        except (OSError, ValueError, http.client.HTTPException) as err:
            errors.append(f"{mirror}{name}: {err}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise OSError("could not download a good copy of " + name + ":\n  " + "\n  ".join(errors))


def load_mnist(
    root: str | os.PathLike[str],
    download: bool = False,
    *,
    checksums: dict[str, str] | None = MNIST_SHA256,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
    with_labels: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> tuple[Tensor, ...]:
    """MNIST as float32 rows in [0, 1]: ``train_x`` (60000, 784) and ``test_x`` (10000, 784).

    Parameters
    ----------
    root : path-like
        Folder holding the four ``*-ubyte.gz`` files.
    download : bool
        Fetch missing files from ``mirrors`` (each verified before it is kept).
    checksums : dict[str, Any], optional
        Expected SHA-256 of each decompressed file; ``None`` skips verification
        (for files you made yourself).
    mirrors : tuple of str
        Base URLs tried in order.
    with_labels : bool
        Also return the labels: ``train_x, train_y, test_x, test_y``.
    timeout : float
        Seconds allowed for each file's download, from connecting to the last
        byte (each is also cut off after its known size plus a small margin).

    Raises
    ------
    FileNotFoundError
        A file is missing and ``download`` is False.
    IDXError, ChecksumError
        A file is malformed or not the published one.
    """
    root = Path(root)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout: expected a finite number of seconds > 0, got {timeout!r}")
    if download:
        root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    if checksums is not None:
        missing = [name for name in MNIST_FILES.values() if name not in checksums]
        if missing:
            raise ValueError(f"checksums: expected a SHA-256 for each of the four files, got none for {missing}")
    for key, name in MNIST_FILES.items():
        expected = None if checksums is None else checksums[name]
        if not (root / name).exists():
            if not download:
                raise FileNotFoundError(f"{root / name}: missing; pass download=True to fetch MNIST")
            _download(name, root, mirrors, expected, timeout)
        arrays[key] = read_idx(root / name, sha256=expected)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise IDXError(f"{root / MNIST_FILES[f'{split}_images']}: expected images of 28 x 28, got {images.shape}")
        label_file, image_file = root / MNIST_FILES[f"{split}_labels"], root / MNIST_FILES[f"{split}_images"]
        if labels.ndim != 1:
            raise IDXError(f"{label_file}: expected a 1-d array of labels, got shape {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise IDXError(
                f"{image_file} holds {images.shape[0]} images but {label_file} holds {labels.shape[0]} labels: "
                "the files do not belong together (train and test files swapped or mixed up?)"
            )
    n_train, n_test = arrays["train_images"].shape[0], arrays["test_images"].shape[0]
    if checksums is None and n_train == 10_000 and n_test == 60_000:
        raise IDXError(
            f"{root}: the training files hold 10000 images and the test files 60000: "
            "the train and test files are swapped"
        )
    train_x, test_x = (_to_unit(arrays[f"{s}_images"], 255.0) for s in ("train", "test"))
    if with_labels:
        train_y, test_y = (torch.from_numpy(arrays[f"{s}_labels"].astype(np.int64)) for s in ("train", "test"))
        return train_x, train_y, test_x, test_y
    return train_x, test_x


def _to_unit(images: np.ndarray, top: float) -> Tensor:
    return torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / top)


def load_digits(*, test_size: int = 297, seed: int = 0, with_labels: bool = False) -> tuple[Tensor, ...]:
    """The embedded 8x8 digits as float32 rows in [0, 1]: (1500, 64) and (297, 64) by default.

    The split is a fixed random permutation (from ``seed``), so every chapter
    sees the same training and test images.
    """
    with resources.files("vaelib").joinpath("digits.npz").open("rb") as f:
        archive = np.load(f)
        images, labels = archive["images"], archive["labels"]
    order = np.random.default_rng(seed).permutation(images.shape[0])
    test, train = order[:test_size], order[test_size:]
    x = _to_unit(images, 16.0)  # pixel values are 0..16
    y = torch.from_numpy(labels.astype(np.int64))
    if with_labels:
        return x[train], y[train], x[test], y[test]
    return x[train], x[test]


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Dynamic binarization: each pixel becomes 1 with probability equal to its intensity.

    .. math::  \\tilde x_j = \\mathbb{1}[u_j < x_j], \\quad u_j \\sim \\mathcal{U}(0, 1),
        \\quad\\text{so}\\quad \\tilde x_j \\sim \\mathrm{Bernoulli}(x_j).

    A fresh draw every time an image is used (Salakhutdinov and Murray 2008;
    Burda et al. 2015) avoids over-fitting a single thresholded copy.

    Parameters
    ----------
    x : Tensor
        Intensities in [0, 1], any shape.
    generator : torch.Generator, optional
        On ``x``'s device; the global generator by default.

    Returns
    -------
    Tensor
        0s and 1s, the shape and dtype of ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1 or not bool(torch.isfinite(x).all())):
        raise ValueError("x: binarize needs finite values in [0, 1]")
    return bernoulli_draw(x, generator)


def bernoulli_draw(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """:func:`~vaelib.data.binarize` without the checks (no host sync), for a training loop.

    The inverse-CDF draw :math:`\\mathbb{1}[u < p]` with one uniform per entry:
    :math:`P(u < p) = p` for :math:`u \\sim \\mathcal{U}(0, 1)`. It is the
    distribution of ``torch.bernoulli(p)`` but not the same stream of draws; on
    a CPU it is two to three times faster for a batch of images, because
    ``torch.bernoulli`` samples entry by entry.

    Parameters
    ----------
    p : Tensor
        Probabilities in [0, 1], any shape (not checked).
    generator : torch.Generator, optional
        On ``p``'s device; the global generator by default.

    Returns
    -------
    Tensor
        0s and 1s, the shape and dtype of ``p``.
    """
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return (u < p).to(p.dtype)
