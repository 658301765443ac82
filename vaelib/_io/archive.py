"""What a checkpoint archive claims, read before any tensor is: member sizes and tensor shapes.

``torch.save`` writes a zip archive: ``NAME/data.pkl`` (a pickle of the
object in which every tensor is a call of ``torch._utils._rebuild_tensor_v2``
on a storage named by a persistent id) and one member ``NAME/data/KEY`` per
storage, stored uncompressed. :func:`inspect` checks the archive's members
against limits and unpickles ``data.pkl`` with every tensor replaced by a
:class:`TensorSpec` (its shape and dtype), reading no tensor bytes and
building nothing. :func:`check_record` then compares those shapes with what
the file's recorded architecture implies, before ``torch.load`` reads a single
weight, so a crafted file of a few kilobytes cannot make vaelib allocate
gigabytes.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaelib._checks import MAX_PARAMETERS, check_architecture
from vaelib.models import VAE
from vaelib.networks import ConvConfig, MLPConfig

__all__ = ["DTYPES", "ArchiveError", "TensorSpec", "UnsafeGlobal", "check_record", "inspect", "nonfinite", "specs_in"]

# No vaelib file comes near these; they bound what is read before the checks below.
MAX_MEMBERS = 10_000
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Parameter dtypes a saved VAE may have.
DTYPES = {str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ArchiveError(ValueError):
    """The archive breaks a rule; the message says which (the caller adds the file's name)."""


class UnsafeGlobal(ArchiveError):
    """The pickle names a Python object other than the few that plain tensors need."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class _StorageSpec:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the pickle describes it: no bytes read."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _SpecUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple[_StorageSpec, int, tuple[int, ...], tuple[int, ...]]] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._tensor
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise UnsafeGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageSpec:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveError(f"an unknown persistent id {str(pid)[:80]!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise ArchiveError(f"a malformed storage record {str(pid)[:80]!r}")
        return _StorageSpec(dtype, str(key), numel)

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorSpec:
        ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else (None,)
        if not isinstance(storage, _StorageSpec) or not all(isinstance(i, int) and i >= 0 for i in ints):
            raise ArchiveError("a malformed tensor record")
        if len(size) != len(stride):
            raise ArchiveError(f"a tensor record with {len(size)} sizes but {len(stride)} strides")
        self.storages.append((storage, offset, size, stride))
        return TensorSpec(tuple(size), storage.dtype)


def inspect(path: Path) -> Any:
    """The object in a ``torch.save`` archive with each tensor as a :class:`TensorSpec`.

    Raises
    ------
    zipfile.BadZipFile
        If ``path`` is not a zip archive.
    UnsafeGlobal
        If the pickle names anything but a dict, a tensor or a storage type.
    ArchiveError
        If a member is compressed or larger than its limit, a storage's member
        is missing or holds another number of bytes than the pickle says, or a
        tensor reaches outside its storage.
    """
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise ArchiveError(f"{len(members)} members, more than the {MAX_MEMBERS} allowed")
        sizes = {}
        for m in members:
            # torch.save stores members uncompressed; a compressed one could inflate without bound.
            if m.compress_type != zipfile.ZIP_STORED or m.compress_size != m.file_size:
                raise ArchiveError(
                    f"member {m.filename!r} is compressed ({m.compress_size} bytes that inflate to "
                    f"{m.file_size}); torch.save writes none, so it was not written by vaelib"
                )
            sizes[m.filename] = m.file_size
        pickles = [name for name in sizes if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ArchiveError("no data.pkl member: not written by torch.save")
        prefix = pickles[0][: -len("data.pkl")]
        if sizes[pickles[0]] > MAX_PICKLE_BYTES:
            raise ArchiveError(
                f"its data.pkl claims {sizes[pickles[0]]} bytes, more than the {MAX_PICKLE_BYTES} allowed"
            )
        data = archive.read(pickles[0])
    unpickler = _SpecUnpickler(data)
    try:
        obj = unpickler.load()
    except ArchiveError:
        raise
    except Exception as err:  # the pickle module raises many types for damaged data
        raise ArchiveError(f"data.pkl is not a readable pickle ({type(err).__name__}: {err})") from err
    for storage, offset, size, stride in unpickler.storages:
        member = f"{prefix}data/{storage.key}"
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        if sizes.get(member) != storage.numel * itemsize:
            raise ArchiveError(
                f"storage {storage.key} should hold {storage.numel * itemsize} bytes, "
                f"but its member {member!r} holds {sizes.get(member, 'no')} bytes"
            )
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if math.prod(size) > 0 and last >= storage.numel:
            raise ArchiveError(f"a tensor of shape {tuple(size)} reaches outside its storage {storage.key}")
    return obj


def specs_in(obj: Any) -> dict[str, TensorSpec] | None:
    """``obj`` (names to tensors or to tensor specs) as names to specs, or ``None`` if it is not one."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        return None
    specs = {}
    for name, t in obj.items():
        if isinstance(t, torch.Tensor):
            t = TensorSpec(tuple(t.shape), t.dtype)
        if not isinstance(t, TensorSpec):
            return None
        specs[name] = t
    return specs


def build(config: MLPConfig | ConvConfig) -> VAE:
    """A fresh VAE of a recorded architecture (:meth:`VAE.mlp` or :meth:`VAE.conv`)."""
    if isinstance(config, ConvConfig):
        return VAE.conv(config.x_shape, config.z_dim, config.channels, config.likelihood)  # type: ignore[arg-type]
    return VAE.mlp(**config.to_dict())


def _recorded_conv(config: dict[str, Any]) -> ConvConfig:
    fields = {key: value for key, value in config.items() if key != "kind"}
    for key in ("x_shape", "channels"):
        if not isinstance(fields.get(key), (list, tuple)):
            raise TypeError(f"{key}: expected a list of sizes, got {fields.get(key)!r:.80}")
    conv = ConvConfig(**{**fields, "x_shape": tuple(fields["x_shape"]), "channels": tuple(fields["channels"])})
    with torch.device("meta"):  # counts parameters without memory
        n = sum(p.numel() for p in build(conv).parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"channels, x_shape: {conv} makes {n:,} parameters, more than the {MAX_PARAMETERS:,} allowed")
    return conv


def _recorded_config(record: Any) -> MLPConfig | ConvConfig | None:
    """The architecture a model record claims, checked against limits; ``None`` for custom networks."""
    if not isinstance(record, dict) or record.get("config") is None:
        return None
    config = record["config"]
    try:
        if isinstance(config, dict) and config.get("kind") == "conv":
            return _recorded_conv(config)
        if not isinstance(config, dict) or not isinstance(config.get("hidden"), (list, tuple)):
            raise TypeError(f"hidden: expected a list of layer sizes, got {config!r:.80}")
        mlp = MLPConfig(**{**config, "hidden": tuple(config["hidden"])})
        check_architecture(mlp.x_dim, mlp.z_dim, mlp.hidden, mlp.likelihood)
    except (KeyError, TypeError, ValueError) as err:
        raise ArchiveError(f"the recorded architecture is invalid: {err}") from err
    return mlp


def check_record(record: Any) -> MLPConfig | ConvConfig | None:
    """Compare a model record's architecture, dtype and tensor shapes (read or not yet read).

    Returns the recorded architecture (``None`` for custom networks, which
    record none). The shapes the architecture implies come from a model built
    on the ``meta`` device, which allocates nothing whatever it claims.
    """
    config = _recorded_config(record)
    if config is None:
        return None
    dtype = DTYPES.get(str(record.get("dtype", "torch.float32")))
    if dtype is None:
        raise ArchiveError(f"unsupported parameter dtype {record.get('dtype')!r}")
    with torch.device("meta"):
        wanted = {name: t.shape for name, t in build(config).state_dict().items()}
    specs = specs_in(record.get("state_dict"))
    if specs is None or set(specs) != set(wanted):
        raise ArchiveError(f"the weights do not fit the recorded architecture {config}: other tensor names")
    for name, spec in specs.items():
        if spec.shape != tuple(wanted[name]) or spec.dtype != dtype:
            raise ArchiveError(
                f"the weights do not fit the recorded architecture {config}: {name} is "
                f"{spec.shape} of {spec.dtype} there, {tuple(wanted[name])} of {dtype} by the architecture"
            )
    return config


def nonfinite(tensors: Any) -> str | None:
    """The name of the first floating-point tensor in ``tensors`` holding NaN or infinity, if any."""
    stack = [("", tensors)]
    while stack:
        name, obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                return name or "a tensor"
        elif isinstance(obj, dict):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in obj.items())
        elif isinstance(obj, (list, tuple)):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(obj))
    return None
