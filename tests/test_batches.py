"""vaelib.training.batches: streamed batches are the resident ones.

So a CPU run ends with the same weights bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import vaelib
from vaelib.training import batches


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return vaelib.data.load_digits()[0][:230]  # 230 rows: the last batch of 50 is short


def trained(data: object, **options: object) -> tuple[dict[str, torch.Tensor], vaelib.training.history.History]:
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(x_dim=64, z_dim=4, hidden=(32,))
    history = vaelib.fit(vae, data, epochs=2, batch_size=50, lr=3e-3, device="cpu", seed=7, progress=False, **options)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}, history


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Rows(Dataset):
    """A map-style data set of NumPy rows with labels, as a reader's own data might come."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.numpy()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.x[i], i % 10


def test_streamed_tensor_ends_with_the_resident_weights(digits):
    """A tensor forced to stream, with a worker process, trains to the resident run's weights exactly."""
    resident, h_resident = trained(digits, stream=False)
    streamed, h_streamed = trained(DataLoader(digits, num_workers=1), stream=True)
    assert same(resident, streamed)
    assert h_resident.train_bound == h_streamed.train_bound


def test_dataset_streamed_or_resident_ends_with_the_tensor_weights(digits):
    """A map-style Dataset of (row, label) pairs, streamed or materialized, gives the tensor's run."""
    reference, _ = trained(digits)
    streamed, _ = trained(DataLoader(Rows(digits), num_workers=0), stream=True)
    resident, _ = trained(Rows(digits), stream=False)
    assert same(reference, streamed) and same(reference, resident)


def test_a_dataloader_gives_its_dataset(digits):
    """Of a DataLoader only the data set is used: its own batch size and shuffling do not matter."""
    reference, _ = trained(digits)
    loader = DataLoader(TensorDataset(digits), batch_size=7, shuffle=True)
    streamed, _ = trained(loader, stream=True)
    assert same(reference, streamed)


@pytest.mark.parametrize("stream", [False, True])
def test_the_callers_random_state_is_left_alone(digits, stream):
    """Reading a data set (materialized or streamed, with a worker) draws nothing from the global generator."""
    vae = vaelib.VAE.mlp(x_dim=64, z_dim=4, hidden=(32,))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    data = DataLoader(TensorDataset(digits), num_workers=1)
    vaelib.fit(vae, data, epochs=1, device="cpu", progress=False, stream=stream)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_different_seed_gives_different_weights(digits):
    """The comparisons above can fail: another order of the rows ends elsewhere."""
    reference, _ = trained(DataLoader(digits, num_workers=0), stream=True)
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(x_dim=64, z_dim=4, hidden=(32,))
    vaelib.fit(vae, digits, epochs=2, batch_size=50, lr=3e-3, device="cpu", seed=8, progress=False, stream=True)
    assert not same(reference, {k: v.detach() for k, v in vae.state_dict().items()})


def test_index_batches_split_each_batch_among_ranks():
    """With 3 ranks, the pieces of each batch are disjoint, consecutive and cover it once."""
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    whole = list(batches.index_batches(perm, 20))
    assert [size for _, size in whole] == [20] * 5 + [3]
    per_rank = [list(batches.index_batches(perm, 20, rank, 3)) for rank in range(3)]
    for j, (idx, size) in enumerate(whole):
        pieces = [per_rank[r][j] for r in range(3)]
        assert all(s == size for _, s in pieces)
        assert torch.equal(torch.cat([p for p, _ in pieces]), idx)
        assert max(len(p) for p, _ in pieces) - min(len(p) for p, _ in pieces) <= 1


def test_the_budget_chooses_the_path(digits, monkeypatch):
    """Resident by default; streamed when the data exceed the device's budget; a forced choice wins."""
    args = {"device": torch.device("cpu"), "dtype": torch.float32, "event_shape": (64,), "likelihood": "bernoulli"}
    assert isinstance(batches.batch_source(TensorDataset(digits), **args), batches.ResidentBatches)
    assert isinstance(batches.batch_source(digits, **args), batches.ResidentBatches)
    monkeypatch.setattr(batches, "device_budget", lambda device: digits.numel() * 4 - 1)
    streamed = batches.batch_source(TensorDataset(digits), **args, workers=0)
    assert isinstance(streamed, batches.StreamedBatches) and streamed.n == len(digits)
    assert isinstance(batches.batch_source(TensorDataset(digits), **args, stream=False), batches.ResidentBatches)
    # a tensor already in memory on the training device stays resident
    assert isinstance(batches.batch_source(digits, **args), batches.ResidentBatches)
    assert batches.device_budget(torch.device("cpu")) > 0


def test_streamed_batches_are_the_resident_ones(digits):
    """The two sources hand out equal batches of the same sizes for the same permutation."""
    args = {"device": torch.device("cpu"), "dtype": torch.float64, "event_shape": (64,), "likelihood": "bernoulli"}
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(1))
    resident = list(batches.batch_source(digits, **args, stream=False).epoch(perm, 64))
    source = batches.batch_source(Rows(digits), **args, stream=True, workers=1)
    streamed = list(source.epoch(perm, 64))
    source.close()
    assert [s for _, s in resident] == [s for _, s in streamed] == [64, 64, 64, 38]
    for (a, _), (b, _) in zip(resident, streamed, strict=True):
        assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.rand(4, 64))


def test_bad_arguments_are_refused(digits):
    vae = vaelib.VAE.mlp(x_dim=64, z_dim=4, hidden=(32,))
    with pytest.raises(TypeError, match="train_x: expected a map-style Dataset"):
        vaelib.fit(vae, Stream(), device="cpu")
    with pytest.raises(TypeError, match="stream: expected True or False"):
        vaelib.fit(vae, digits, device="cpu", stream="yes")
    with pytest.raises(ValueError, match="train_x: expected 64 features"):
        vaelib.fit(vae, TensorDataset(torch.rand(10, 63)), device="cpu", stream=True)
    with pytest.raises(ValueError, match="train_x: expected a data set with at least one item"):
        vaelib.fit(vae, TensorDataset(torch.rand(0, 64)), device="cpu")
    with pytest.raises(TypeError, match=r"train_x: expected a torch\.Tensor or numpy array, a map-style Dataset"):
        vaelib.fit(vae, [[0.0] * 64], device="cpu")


def test_the_streaming_benchmark_runs_tiny(tmp_path):
    """benchmarks.streaming on 300 digits: every way trains, the record has the figures and equal weights."""
    from benchmarks import streaming

    argv = ["--train-size", "300", "--epochs", "2", "--repeats", "2", "--workers", "0,1", "--out", str(tmp_path)]
    record = streaming.main(argv)
    assert record["same_weights"] is True and record["train_images"] == 300 and record["source"] == "items"
    assert record["workers"] == 0 and set(record["by_workers"]) == {"0", "1"}
    assert len(record["resident_seconds"]) == 2 and len(record["by_workers"]["1"]["seconds"]) == 2
    assert record["ratio"] == record["by_workers"]["0"]["ratio"] > 0
    assert (tmp_path / "streaming-digits-cpu.json").exists()
