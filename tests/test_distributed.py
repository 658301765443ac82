"""vaelib.training.distributed: two gloo processes under torchrun train the model that one process trains.

And they resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import _ddp_fit

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds: a hung rendezvous or collective fails the test instead of blocking the suite


def torchrun(out: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 tests/_ddp_fit.py`` (a free port is found by the launcher)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["--monitor-interval", "0.1", str(ROOT / "tests" / "_ddp_fit.py"), str(out), str(epochs), *extra]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def one_process(epochs: int) -> dict[str, torch.Tensor]:
    _ddp_fit.mean_code_bound.rows = 0
    vae, _ = _ddp_fit.train(epochs)
    assert _ddp_fit.mean_code_bound.rows == _ddp_fit.ROWS * epochs
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in a)


@pytest.fixture(scope="module")
def reference() -> dict[int, dict[str, torch.Tensor]]:
    """One process, the same global batch of 50 rows: the weights after 2 and after 3 epochs."""
    return {2: one_process(2), 3: one_process(3)}


def test_two_ranks_take_the_steps_of_one_process(tmp_path, reference):
    """Each rank trains on half of every batch; the all-reduced mean gradient gives one process's weights."""
    done = torchrun(tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(r["rows"] for r in ranks) == [100 * 2, 101 * 2]  # a share of each batch, not all of it
    assert ranks[0]["train_bound"] == ranks[1]["train_bound"]  # the bound of the whole epoch on both
    for r in ranks:
        assert close(r["state"], reference[2])
    assert not close(reference[2], reference[3])  # the comparison can fail: one more epoch moves the weights
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / ".checkpoint.pt.lock").exists()


@pytest.mark.slow
def test_a_killed_rank_resumes_from_the_last_checkpoint(tmp_path, reference):
    """Rank 1 is killed after epoch 1's checkpoint; --resume continues at epoch 2 and ends where one run ends.

    Both runs stream their rows from a data set of (image, label) pairs: the same batches as the resident run.
    """
    killed = torchrun(tmp_path, 3, "--kill-after", "1", "--stream")
    assert killed.returncode != 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "rank0.pt").exists()
    resumed = torchrun(tmp_path, 3, "--resume", "--stream")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["epochs"] == [1, 2, 3]
    # the resumed ranks trained epochs 2 and 3 only: the first came from the checkpoint
    assert sorted(r["rows"] for r in ranks) == [100 * 2, 101 * 2]
    for r in ranks:
        assert close(r["state"], reference[3])


@pytest.mark.slow
def test_the_command_line_under_torchrun_trains_and_resumes(tmp_path):
    """``torchrun -m vaelib train``: rank 0 alone prints and writes; --resume continues the history."""
    out = tmp_path / "run"
    options = ["--data", "digits", "--batch-size", "50", "--hidden", "16", "--z-dim", "3", "--test-k", "5"]
    options += ["--device", "cpu", "--out", str(out)]

    def launch(*extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command += ["-m", "vaelib", "train", *options, *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)

    first = launch("--epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("epoch 2/2") == 1 and first.stdout.count("test ELBO") == 1
    before = json.loads((out / "metrics.json").read_text())["history"]
    second = launch("--epochs", "3", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "epoch 1/3" not in second.stdout and second.stdout.count("epoch 3/3") == 1
    after = json.loads((out / "metrics.json").read_text())["history"]
    assert after["epoch"] == [1, 2, 3]
    assert after["train_bound"][:2] == before["train_bound"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "run.json", "samples.png"]


def test_iwae_table_places_one_model_per_device(tmp_path, monkeypatch):
    """benchmarks.iwae_table --devices: model i trains in its own process on device i (mod the device count)."""
    from benchmarks import iwae_table

    started: list[list[str]] = []

    class Worker:
        def __init__(self, command: list[str], cwd: object) -> None:
            started.append(command)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(iwae_table.subprocess, "Popen", Worker)
    settings = iwae_table.Settings(
        smoke=True,
        data_dir=None,
        device=torch.device("cpu"),
        checkpoint_dir=tmp_path,
        stages=1,
        until_stage=None,
        deadline=None,
        seed=0,
    )
    specs = [iwae_table.spec(m) for m in iwae_table.MODELS]
    assert iwae_table.parse_devices("cpu, cpu") == [torch.device("cpu")] * 2
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]  # the workers are not started here
    iwae_table.train_all(specs, torch.zeros(1, 64), settings, parallel=True, threads=1, devices=gpus)
    assert [c[c.index("--worker") + 1] for c in started] == list(iwae_table.MODELS)
    assert all(c.count("--device") == 1 for c in started)
    assert [c[c.index("--device") + 1] for c in started] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(SystemExit, match="--devices"):
        iwae_table.parse_devices("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--devices all needs CUDA"):
            iwae_table.parse_devices("all")
