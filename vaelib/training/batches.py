"""Where an epoch's batches come from: resident on the device, or streamed from the host.

Every epoch :func:`vaelib.training.fit.fit` draws one permutation of the rows from
``(seed, epoch)`` and cuts it into batches of ``batch_size`` rows; the two
sources below turn those index batches into data on the device.

* :class:`ResidentBatches` holds the whole data set on the device and slices
  each batch from it: no copies between host and device during training.
* :class:`StreamedBatches` keeps the data on the host (a tensor or a map-style
  :class:`torch.utils.data.Dataset`) and gathers each batch there with a
  :class:`torch.utils.data.DataLoader` over the same index batches: worker
  processes, pinned memory on a GPU, a non-blocking copy to the device, and the
  next batch on its way while the current one trains.

Both read the rows in the same order, so a run gives the same batches, and on
a CPU the same weights bit for bit, whichever source it uses.
:func:`batch_source` picks one: resident when the data fit half the memory
the device has free (:func:`device_budget`), streamed otherwise, unless the
caller forces either.

References
----------
Paszke et al. (2019), "PyTorch: An Imperative Style, High-Performance Deep
Learning Library" (the ``DataLoader``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from vaelib._checks import as_tensor, check_bool, check_data, check_nonnegative_int

__all__ = [
    "ResidentBatches",
    "StreamedBatches",
    "batch_source",
    "default_workers",
    "device_budget",
    "index_batches",
]


def index_batches(perm: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, int]]:
    """Cut an epoch's permutation into batches; yield this rank's rows of each and the batch's size.

    Batch :math:`j` is ``perm[j * batch_size : (j + 1) * batch_size]`` (the last one
    may be shorter); with ``world_size`` processes, rank :math:`r` takes the
    :math:`r`-th of ``world_size`` nearly equal consecutive pieces of it
    (``torch.tensor_split``), so the ranks together cover each batch once.

    Yields
    ------
    (Tensor, int)
        This rank's indices, shape ``(rows,)``, and the size of the whole batch.
    """
    n = perm.shape[0]
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]  # (batch,)
        if world_size > 1:
            idx = torch.tensor_split(idx, world_size)[rank]  # (about batch / world_size,)
        yield idx, min(batch_size, n - i)


def device_budget(device: torch.device) -> int:
    """Bytes of training data that may live on ``device``: half of the memory it has free.

    On CUDA the free memory is ``torch.cuda.mem_get_info``; on Apple's MPS
    the recommended working set; on the CPU the available physical memory.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    if device.type == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        if recommended is not None:
            return int(recommended()) // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume the data fit
        return 2**62


def default_workers(device: torch.device) -> int:
    """Worker processes that gather streamed batches for ``device``: at most 4.

    For an accelerator, half the CPU cores (at least 1): the host only gathers
    and copies. For the CPU, one fewer (none on 2 cores): there the workers take
    cores from the training steps themselves.
    """
    half = (os.cpu_count() or 2) // 2
    return min(4, max(1, half) if device.type != "cpu" else max(0, half - 1))


def _row(item: object) -> Tensor:
    """A data set's item as a tensor: the item itself, or the first element of a pair ``(x, y)``."""
    if isinstance(item, tuple | list):
        item = item[0]
    return as_tensor(item if isinstance(item, Tensor | np.ndarray) else np.asarray(item), "train_x")


class _Rows(Dataset[Tensor]):
    """A tensor or map-style data set whose batches are gathered in one call (``__getitems__``)."""

    def __init__(self, data: Tensor | Dataset[Any]) -> None:
        # a TensorDataset's rows are its first tensor: one indexing gathers a batch
        self.data = data.tensors[0] if isinstance(data, TensorDataset) else data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        if isinstance(self.data, Tensor):
            return self.data[torch.as_tensor(indices, dtype=torch.long)]  # (batch, *event_shape)
        if len(indices) == 0:  # a rank's share of a batch shorter than the rank count
            first = _row(self.data[0])
            return first.new_empty((0, *first.shape))
        items = [self.data[i] for i in indices]
        if isinstance(items[0], tuple | list):
            items = [item[0] for item in items]  # (x, y) pairs: the rows
        if all(isinstance(item, Tensor) for item in items):
            return as_tensor(torch.stack(items), "train_x")  # (batch, *event_shape)
        return torch.stack([_row(item) for item in items])  # (batch, *event_shape)


def _batch(rows: Any) -> Any:
    """The DataLoader's collate function: ``__getitems__`` has stacked the batch already."""
    return rows


class _EpochSampler:
    """The index batches of the current epoch; the DataLoader's workers outlive an epoch, the batches do not."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ResidentBatches:
    """The whole data set on the device; each batch is sliced from it.

    Parameters
    ----------
    x : Tensor, shape ``(n, *event_shape)``
        The data, moved to ``device`` in ``dtype`` once.
    """

    streamed = False

    def __init__(self, x: Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.x = x.to(device, dtype)  # resident on the device for the whole run
        self.n = int(self.x.shape[0])

    def epoch(
        self, perm: Tensor, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> Iterator[tuple[Tensor, int]]:
        """This rank's rows of each batch of the epoch, on the device, and the whole batch's size."""
        for idx, size in index_batches(perm, batch_size, rank, world_size):
            yield self.x[idx], size  # (rows, *event_shape)

    def close(self) -> None:
        """Nothing to release."""


class StreamedBatches:
    """Batches gathered on the host by a DataLoader and copied to the device one step ahead.

    Parameters
    ----------
    data : Tensor or torch.utils.data.Dataset
        Rows on the host; a data set's items are tensors or arrays of shape
        ``event_shape``, or pairs whose first element is one.
    workers : int
        DataLoader worker processes (0 gathers in the training process). They
        start with the first epoch and serve every epoch of the run.
    """

    streamed = True

    def __init__(self, data: Tensor | Dataset[Any], device: torch.device, dtype: torch.dtype, workers: int) -> None:
        self.rows = _Rows(data.cpu() if isinstance(data, Tensor) else data)
        self.n = len(self.rows)
        self.device, self.dtype = device, dtype
        self._sampler = _EpochSampler()
        self._generator = torch.Generator()  # the loader's own seeds: the global generator is not drawn from
        self.loader = DataLoader(
            self.rows,
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_batch,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=self._generator,
        )

    def epoch(
        self, perm: Tensor, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> Iterator[tuple[Tensor, int]]:
        """This rank's rows of each batch of the epoch, on the device, and the whole batch's size.

        The copy of batch :math:`j + 1` to the device is issued before batch
        :math:`j` is handed out, so on a GPU it overlaps batch :math:`j`'s step.
        """
        pieces = list(index_batches(perm.cpu(), batch_size, rank, world_size))
        self._sampler.batches = [idx.tolist() for idx, _ in pieces]
        self._generator.manual_seed(seed)
        sizes = iter([size for _, size in pieces])
        host = iter(self.loader)
        ahead = self._to_device(next(host, None))
        while ahead is not None:
            current = ahead
            ahead = self._to_device(next(host, None))
            yield current, next(sizes)

    def _to_device(self, xb: Tensor | None) -> Tensor | None:
        if xb is None:
            return None
        return xb.to(self.device, self.dtype, non_blocking=True)  # (rows, *event_shape)

    def close(self) -> None:
        """Stop the worker processes."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def _item_shape(data: Dataset[Any], event_shape: tuple[int, ...], likelihood: str) -> Tensor:
    """Check the data set's first item (the rest are read only while training); return it as one row."""
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError("train_x: expected a data set with at least one item, got an empty one")
    return check_data(_row(data[0])[None], "train_x", event_shape=event_shape, likelihood=likelihood)


def _gather(data: Dataset[Any], workers: int, chunk: int = 1024) -> Tensor:
    """Every row of a data set, in order, read by ``workers`` processes a chunk at a time."""
    n = len(data)  # type: ignore[arg-type]
    chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    own = torch.Generator()  # not the caller's global generator
    loader = DataLoader(_Rows(data), batch_sampler=chunks, num_workers=workers, collate_fn=_batch, generator=own)
    return torch.cat(list(loader))  # (n, *event_shape)


def batch_source(
    data: Tensor | np.ndarray | Dataset[Any] | DataLoader[Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    event_shape: tuple[int, ...],
    likelihood: str,
    stream: bool | None = None,
    workers: int | None = None,
) -> ResidentBatches | StreamedBatches:
    """The batch source for ``data``: resident when it fits the device's budget, streamed otherwise.

    Parameters
    ----------
    data : Tensor, ndarray, torch.utils.data.Dataset or torch.utils.data.DataLoader
        The training rows, shape ``(n, *event_shape)``; of a DataLoader only its
        ``dataset`` (and its ``num_workers``, unless ``workers`` is given) is used.
        A tensor or array is checked whole; a data set only by its first item.
    stream : bool, optional
        ``True`` streams, ``False`` holds the data on the device; by default the data
        are resident when their size on the device, :math:`n \\cdot d \\cdot` bytes per
        value, is at most :func:`device_budget`.
    workers : int, optional
        Worker processes of a streamed source (:func:`default_workers` if not given).

    Raises
    ------
    TypeError
        If ``data`` is an iterable-style data set, or not data at all.
    ValueError
        If the rows do not have the model's shape, or ``stream`` or ``workers`` is not valid.
    """
    if stream is not None:
        check_bool(stream, "stream")
    if isinstance(data, DataLoader):
        workers = data.num_workers if workers is None else workers
        data = data.dataset
    workers = default_workers(device) if workers is None else check_nonnegative_int(workers, "workers")
    if isinstance(data, IterableDataset):
        raise TypeError("train_x: expected a map-style Dataset (with __len__ and __getitem__), got an IterableDataset")
    if isinstance(data, Tensor) and data.requires_grad:
        raise ValueError("train_x: expected data that do not require grad; pass train_x.detach()")
    if isinstance(data, Tensor | np.ndarray):
        x = check_data(data, "train_x", event_shape=event_shape, likelihood=likelihood)
        size = x.numel() * dtype.itemsize
        if stream is None:
            stream = x.device != device and size > device_budget(device)
        return StreamedBatches(x, device, dtype, workers) if stream else ResidentBatches(x, device, dtype)
    if not (isinstance(data, Dataset) and hasattr(data, "__len__")):
        raise TypeError(
            "train_x: expected a torch.Tensor or numpy array, a map-style Dataset or a DataLoader, "
            f"got {type(data).__name__}"
        )
    first = _item_shape(data, event_shape, likelihood)
    size = len(data) * math.prod(first.shape[1:]) * dtype.itemsize
    if stream is None:
        stream = size > device_budget(device)
    if stream:
        return StreamedBatches(data, device, dtype, workers)
    x = check_data(_gather(data, workers), "train_x", event_shape=event_shape, likelihood=likelihood)
    return ResidentBatches(x, device, dtype)
