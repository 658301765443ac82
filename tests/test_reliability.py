"""Faults, bad files and bad numbers, tried on purpose.

Killed training runs resume bitwise; extreme log weights, constant images and a
collapsing decoder variance keep the bounds finite; divergence and interrupts
leave the model and its checkpoint at the last good epoch. Damaged and unsafe
files are tried in ``test_checkpoint.py`` and ``test_data.py``.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vaelib
from vaelib.training.model_file import read_checkpoint

X_DIM = 64


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return vaelib.data.load_digits()[0][:300]


def tiny(likelihood: str = "bernoulli", hidden: tuple[int, ...] = (8,), seed: int = 0, **kw) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=hidden, likelihood=likelihood, **kw)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a, b) -> bool:
    """Bitwise equality of nested checkpoint contents (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# -- killed training ----------------------------------------------------------------------

# One gradient step per epoch (batch = all 1500 images), so an epoch is mostly its checkpoint write.
KILL_EPOCHS = 150
KILL_ARGS = ["train", "--hidden", "4", "--z-dim", "2", "--batch-size", "1500", "--test-k", "2", "--seed", "3"]
KILL_ARGS += ["--epochs", str(KILL_EPOCHS)]


def _train_child(argv: list[str], log: str, kill_in_save: tuple[int, float] | None) -> None:
    """``vaelib train`` in a child process; with ``kill_in_save=(n, f)`` it SIGKILLs itself part-way
    through its n-th checkpoint write, after a fraction f of the file's bytes (f = 1: before the rename)."""
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if kill_in_save is not None:
        nth, fraction = kill_in_save
        real_save, calls = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] < nth:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: int(fraction * len(buffer.getvalue()))])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
    from vaelib.cli import main

    sys.exit(main(argv))


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".checkpoint.pt.*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_killed_training_resumes_bitwise(tmp_path):
    """SIGKILL at 25 seeded moments, half of them inside a checkpoint write: the checkpoint on disk
    always loads, and resuming each time ends with exactly the weights of an uninterrupted run."""
    rng = random.Random(20240611)
    # Children fork from a server that has already imported torch and vaelib: they start in milliseconds.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["vaelib.cli", __name__])
    log = str(tmp_path / "log.txt")

    def child(out: Path, kill_in_save=None, resume=True):
        argv = [*KILL_ARGS, "--out", str(out)] + (["--resume"] if resume else [])
        return ctx.Process(target=_train_child, args=(argv, log, kill_in_save))

    reference = child(tmp_path / "reference", resume=False)
    reference.start()
    reference.join(300)
    assert reference.exitcode == 0, Path(log).read_text()[-2000:]

    out = tmp_path / "killed"
    checkpoint = out / "checkpoint.pt"
    # Trial 0: the real entry point, `python -m vaelib train`, killed once it has written a few epochs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "vaelib", *KILL_ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for _ in range(rng.randint(1, 4)):
        assert proc.stdout.readline().startswith("epoch ")
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    epoch, in_write, trials = read_checkpoint(checkpoint)["epoch"], 0, 1
    for trial in range(24):
        if trial % 2 == 0:  # at a random moment: starting up, training, or writing
            p = child(out)
            p.start()
            time.sleep(rng.uniform(0.0, 0.15))
            p.kill()
        else:  # inside the n-th checkpoint write, after a random share of its bytes
            nth, fraction = rng.randint(1, 3), rng.choice([0.0, rng.random(), 1.0])
            p = child(out, kill_in_save=(nth, fraction))
            p.start()
        p.join(120)
        trials += 1
        assert p.exitcode in (-signal.SIGKILL, 0), Path(log).read_text()[-2000:]
        leftover = _temporaries(out)
        killed_in_write = trial % 2 == 1 and p.exitcode == -signal.SIGKILL
        if checkpoint.exists():
            saved = read_checkpoint(checkpoint)  # always loads, never half-written
            vaelib.load(checkpoint)
            assert saved["epoch"] >= epoch and saved["history"]["epoch"] == list(range(1, saved["epoch"] + 1))
            if killed_in_write:
                assert leftover, "a kill inside a write leaves its temporary file"
                assert saved["epoch"] == epoch + nth - 1, "the interrupted write must not replace the checkpoint"
            epoch = saved["epoch"]
        in_write += killed_in_write
    assert trials >= 20 and in_write >= 10 and 0 < epoch < KILL_EPOCHS, (trials, in_write, epoch)

    last = child(out)
    last.start()
    last.join(300)
    assert last.exitcode == 0, Path(log).read_text()[-2000:]
    assert _temporaries(out) == []  # the killed writes' temporary files are cleaned up
    resumed, uninterrupted = read_checkpoint(checkpoint), read_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    assert resumed["epoch"] == KILL_EPOCHS
    assert same_weights(resumed["model"]["state_dict"], uninterrupted["model"]["state_dict"])
    assert same_state(resumed["optimizer"], uninterrupted["optimizer"])
    assert resumed["history"]["train_bound"] == uninterrupted["history"]["train_bound"]


# -- bad numbers --------------------------------------------------------------------------


def _reference_bounds(log_w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """log-mean-exp and mean in float64 NumPy, with the max shifted out by hand."""
    w = log_w.double().numpy()
    top = w.max(axis=0)
    iwae = top + np.log(np.exp(w - top).sum(axis=0)) - math.log(w.shape[0])
    return iwae, w.mean(axis=0)


@pytest.mark.parametrize("k", [1, 2, 50, 5000])
def test_bounds_of_log_weights_spread_over_thousands_of_nats(k):
    """float32 log weights from -5000 to +3000 nats (one column all far below, one far above):
    finite bounds that agree with a float64 reference to float32 rounding."""
    g = torch.Generator().manual_seed(k)
    spread = -5000 + 8000 * torch.rand(k, 3, generator=g)
    low = torch.full((k, 1), -4000.0) - 300 * torch.rand(k, 1, generator=g)
    high = torch.full((k, 1), 3000.0) + 50 * torch.rand(k, 1, generator=g)
    log_w = torch.cat([spread, low, high], dim=1).float()  # (k, 5)
    if k > 1:
        log_w[0, 0] = -math.inf  # a zero weight among others is allowed
    iwae, elbo = vaelib.iwae_from_log_weights(log_w), vaelib.elbo_from_log_weights(log_w[:, 1:])
    assert iwae.dtype == torch.float32 and torch.isfinite(iwae).all() and torch.isfinite(elbo).all()
    ref_iwae, ref_elbo = _reference_bounds(log_w)
    eps = torch.finfo(torch.float32).eps
    scale = float(log_w[torch.isfinite(log_w)].abs().max())
    assert np.allclose(iwae.double().numpy(), ref_iwae, rtol=0, atol=8 * eps * scale)
    assert np.allclose(elbo.double().numpy(), ref_elbo[1:], rtol=0, atol=8 * eps * scale)
    assert (iwae.double().numpy() >= ref_elbo - 8 * eps * scale)[1:].all()  # Jensen: IWAE >= ELBO


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_images_train_and_score_finitely(value, digits):
    """Images all zero or all one: training and every bound stay finite."""
    x = torch.full((200, X_DIM), value)
    vae = tiny()
    history = vaelib.fit(vae, x, epochs=3, batch_size=50, lr=1e-2, device="cpu", progress=False)
    assert all(math.isfinite(b) for b in history.train_bound)
    for bound in (vae.elbo(x, k=4), vae.elbo(x, analytic_kl=True), vae.iwae(x, k=16)):
        assert torch.isfinite(bound).all()
    assert torch.isfinite(vaelib.log_likelihood(vae, x, k=64, progress=False)).all()


def test_gaussian_decoder_variance_collapse_stays_finite():
    """A Gaussian decoder driven to zero variance: the scale floor keeps every bound finite."""
    vae = tiny("gaussian")
    last = vae.decoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias[:X_DIM] = 0.5  # the mean
        last.bias[X_DIM:] = -1e4  # softplus of this is 0 in float32: a zero standard deviation
    x = torch.full((20, X_DIM), 0.5)
    x[:, 0] = 0.0  # one pixel off the mean by 0.5, i.e. 500 floors
    scale = vae.decode(torch.zeros(1, 2)).base_dist.scale.detach()
    assert float(scale.min()) == pytest.approx(vaelib.models.MIN_DECODER_SCALE)
    for bound in (vae.elbo(x, k=3), vae.iwae(x, k=8), vae.elbo(x, analytic_kl=True)):
        assert torch.isfinite(bound).all()
    # And training on data with constant pixels, which pulls the variance down, stays finite.
    history = vaelib.fit(tiny("gaussian"), x, epochs=20, batch_size=20, lr=0.05, device="cpu", progress=False)
    assert all(math.isfinite(b) for b in history.train_bound)


def test_diverging_learning_rate_stops_with_the_epoch_named(tmp_path):
    """lr = 1000 on a Gaussian decoder: TrainingDiverged names the epoch; the model and the last
    checkpoint are the previous epoch's, finite, and exactly those of a run that stopped there."""
    x = vaelib.data.load_digits()[0]
    path = tmp_path / "checkpoint.pt"
    vae = tiny("gaussian", hidden=(16,), activation="relu")
    options = {"batch_size": 1500, "lr": 1000.0, "device": "cpu", "progress": False}
    with pytest.raises(vaelib.TrainingDiverged, match=r"diverged in epoch 2: .* restored to epoch 1; the checkpoint"):
        vaelib.fit(vae, x, epochs=5, checkpoint=path, **options)
    one_epoch = tiny("gaussian", hidden=(16,), activation="relu")
    vaelib.fit(one_epoch, x, epochs=1, **options)
    saved = vaelib.load(path)
    assert read_checkpoint(path)["epoch"] == 1
    assert same_weights(saved.state_dict(), one_epoch.state_dict())
    assert same_weights(vae.state_dict(), one_epoch.state_dict())
    assert all(torch.isfinite(p).all() for p in saved.parameters())


class _StepHook:
    """Wraps Adam.step to do something to the model after the n-th step of a run (1-based)."""

    def __init__(self, monkeypatch, n: int, action) -> None:
        self.count, self.n, self.action = 0, n, action
        real = torch.optim.Adam.step

        def step(opt, *args, **kwargs):
            out = real(opt, *args, **kwargs)
            self.count += 1
            if self.count == self.n:
                self.action(opt)
            return out

        monkeypatch.setattr(torch.optim.Adam, "step", step)


def _poison(opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        opt.param_groups[0]["params"][0].fill_(math.nan)


@pytest.mark.parametrize("step", [32, 36], ids=["mid-epoch", "last-step-of-epoch"])
def test_weights_broken_within_an_epoch_are_caught(monkeypatch, tmp_path, digits, step):
    """NaN weights after step 32 (mid epoch 3, at 12 steps an epoch) or step 36 (the last of epoch 3,
    after its bounds were taken): TrainingDiverged for epoch 3, and the checkpoint stays at epoch 2."""
    path = tmp_path / "checkpoint.pt"
    _StepHook(monkeypatch, step, _poison)
    vae = tiny()
    with pytest.raises(vaelib.TrainingDiverged, match="diverged in epoch 3"):
        vaelib.fit(vae, digits, epochs=5, batch_size=25, checkpoint=path, device="cpu", progress=False)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 2
    two_epochs = tiny()
    vaelib.fit(two_epochs, digits, epochs=2, batch_size=25, device="cpu", progress=False)
    assert same_weights(vaelib.load(path).state_dict(), two_epochs.state_dict())
    assert same_weights(vae.state_dict(), two_epochs.state_dict())


# -- interrupted notebook -----------------------------------------------------------------


def _interrupt(opt: torch.optim.Optimizer) -> None:
    raise KeyboardInterrupt


def test_keyboard_interrupt_mid_epoch(monkeypatch, tmp_path, digits):
    """Ctrl-C in the middle of epoch 3: fit returns the history of 2 epochs, marked interrupted, with
    the model exactly as after epoch 2; resuming from the checkpoint then matches an uninterrupted run."""
    path = tmp_path / "checkpoint.pt"
    options = {"batch_size": 25, "device": "cpu", "progress": False}
    _StepHook(monkeypatch, 2 * 12 + 5, _interrupt)  # 12 steps per epoch
    vae = tiny()
    with pytest.warns(UserWarning, match="interrupted during epoch 3; the model is as it was after epoch 2"):
        history = vaelib.fit(vae, digits, epochs=4, checkpoint=path, **options)
    monkeypatch.undo()
    assert history.interrupted and history.epoch == [1, 2] and len(history.train_bound) == 2
    two, four = tiny(), tiny()
    reference = vaelib.fit(two, digits, epochs=2, **options)
    assert history.train_bound == reference.train_bound
    assert same_weights(vae.state_dict(), two.state_dict())
    resumed = vaelib.fit(vae, digits, epochs=4, checkpoint=path, resume=True, **options)
    vaelib.fit(four, digits, epochs=4, **options)
    assert resumed.epoch == [1, 2, 3, 4] and not resumed.interrupted
    assert same_weights(vae.state_dict(), four.state_dict())


def test_keyboard_interrupt_in_the_callback(digits):
    """Ctrl-C while the callback runs after epoch 2: the epoch is complete, so it is kept."""

    def callback(history):
        if len(history) == 2:
            raise KeyboardInterrupt

    vae, two = tiny(), tiny()
    with pytest.warns(UserWarning, match="interrupted during epoch 2; the model is as it was after epoch 2"):
        history = vaelib.fit(vae, digits, epochs=5, callback=callback, device="cpu", progress=False)
    assert history.interrupted and history.epoch == [1, 2]
    vaelib.fit(two, digits, epochs=2, device="cpu", progress=False)
    assert same_weights(vae.state_dict(), two.state_dict())
