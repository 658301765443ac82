"""Callbacks with control: stopping keeps the history, early stopping restores the best weights, logs."""

from __future__ import annotations

import csv
import math
import sys

import pytest
import torch

import vaelib
from vaelib.training.callbacks import Callback, CSVLogger, EarlyStopping, TensorBoard, TrainState

X_DIM = 64
OPTIONS = {"device": "cpu", "progress": False, "batch_size": 50}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    train, test = vaelib.data.load_digits()
    return train[:300], test[:100]


def tiny(seed: int = 0) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=(16,))


def weights(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_plain_function_stops_training_and_keeps_the_history(digits):
    """A function returning True after epoch 3 of 10 ends training there: the history holds 3 epochs,
    names the stop, and the model equals a 3-epoch run."""
    vae, three = tiny(), tiny()
    history = vaelib.fit(vae, digits[0], epochs=10, callbacks=[lambda h: len(h) == 3], **OPTIONS)
    assert history.epoch == [1, 2, 3] and not history.interrupted
    assert history.stopped is not None and "lambda" in history.stopped
    vaelib.fit(three, digits[0], epochs=3, **OPTIONS)
    assert same(weights(vae), weights(three))


class Recorder(Callback):
    """Notes each hook's call and keeps a copy of the weights after every epoch."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.weights: dict[int, dict] = {}

    def on_train_begin(self, logs=None):
        self.calls.append("begin")

    def on_epoch_end(self, epoch, logs):
        assert self.state is not None and self.state.epoch == epoch
        self.calls.append(f"epoch {epoch}")
        self.weights[epoch] = weights(self.state.vae)
        return False

    def on_train_end(self, logs=None):
        self.calls.append("end")


class Scrambler(Callback):
    """Ruins the weights after epoch ``at``, so that the validation bound falls."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_end(self, epoch, logs):
        if epoch == self.at:
            with torch.no_grad():
                for p in self.state.vae.parameters():
                    p.mul_(-30.0)
        return False


def test_early_stopping_restores_the_best_weights(digits):
    """Weights ruined after epoch 4: the validation bound falls, EarlyStopping(patience=2) stops at
    epoch 6, and the model ends with the weights of epoch 4 exactly."""
    train, test = digits
    recorder = Recorder()
    stopper = EarlyStopping(patience=2, restore_best_weights=True)
    vae = tiny()
    history = vaelib.fit(
        vae, train, valid_x=test, epochs=20, lr=3e-3, callbacks=[recorder, stopper, Scrambler(4)], **OPTIONS
    )
    assert history.epoch == [1, 2, 3, 4, 5, 6]
    assert history.stopped == "EarlyStopping(monitor='valid_bound', patience=2)"
    assert stopper.best_epoch == 4 and max(history.valid_bound) == history.valid_bound[3]
    assert recorder.calls == ["begin", *[f"epoch {e}" for e in range(1, 7)], "end"]
    assert same(weights(vae), recorder.weights[4])
    assert not same(weights(vae), recorder.weights[6])


def test_early_stopping_with_restored_weights(digits):
    """EarlyStopping(patience=1, restore_best_weights=True) stops after a worse validation and restores the best."""
    train, test = digits
    recorder = Recorder()
    vae = tiny()
    history = vaelib.fit(
        vae,
        train,
        valid_x=test,
        epochs=20,
        lr=3e-3,
        callbacks=[vaelib.EarlyStopping(patience=1, restore_best_weights=True), recorder, Scrambler(3)],
        **OPTIONS,
    )
    assert history.epoch == [1, 2, 3, 4]
    assert history.stopped.startswith("EarlyStopping")
    assert same(weights(vae), recorder.weights[3])


def test_restore_best_without_patience_trains_to_the_end(digits):
    """EarlyStopping(patience=inf, restore_best_weights=True) never stops, and leaves the best validated epoch."""
    train, test = digits
    recorder = Recorder()
    vae = tiny()
    history = vaelib.fit(
        vae,
        train,
        valid_x=test,
        epochs=5,
        lr=3e-3,
        callbacks=[vaelib.EarlyStopping(patience=math.inf, restore_best_weights=True), recorder, Scrambler(3)],
        **OPTIONS,
    )
    assert len(history) == 5 and history.stopped is None
    best = max(range(5), key=lambda i: history.valid_bound[i]) + 1
    assert best == 3
    assert same(weights(vae), recorder.weights[best])


def test_early_stopping_counts_validations_only():
    """Epochs without the monitored key are skipped; min_delta sets what counts as better."""
    vae = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2, min_delta=0.5)
    stopper.set_state(TrainState(vae, torch.optim.SGD(vae.parameters(), lr=0.1), vaelib.History()))
    stopper.on_train_begin()
    scores = [1.0, None, 1.4, None, 1.3]  # 1.4 is not better than 1.0 by 0.5
    stops = [stopper.on_epoch_end(e, {} if s is None else {"valid_bound": s}) for e, s in enumerate(scores, 1)]
    assert stops == [False, False, False, False, True]
    assert stopper.best == 1.0 and stopper.best_epoch == 1


def test_csv_logger_writes_one_row_per_epoch(tmp_path, digits):
    """CSVLogger's rows are the history's numbers; append=True adds rows under the same header."""
    train, test = digits
    path = tmp_path / "log" / "run.csv"
    history = vaelib.fit(tiny(), train, valid_x=test, valid_every=2, epochs=3, callbacks=[CSVLogger(path)], **OPTIONS)
    rows = list(csv.DictReader(path.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["train_bound"]) for r in rows] == history.train_bound
    assert rows[0]["valid_bound"] == "" and float(rows[1]["valid_bound"]) == history.valid_bound[1]
    assert float(rows[0]["lr"]) == 1e-3
    vaelib.fit(tiny(), train, epochs=2, callbacks=[CSVLogger(path, append=True)], **OPTIONS)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3 + 2 and lines[0].startswith("epoch,train_bound")


def test_tensorboard_missing_says_what_to_install(monkeypatch):
    """Without the tensorboard package, TensorBoard() raises an ImportError naming the package."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoard(log_dir="runs")


def test_tensorboard_writes_event_files(tmp_path, digits):
    """Where tensorboard is installed, the callback writes an event file to log_dir."""
    pytest.importorskip("tensorboard")
    vaelib.fit(tiny(), digits[0], epochs=2, callbacks=[TensorBoard(tmp_path / "tb")], **OPTIONS)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_on_train_end_runs_after_an_interrupt(monkeypatch, digits):
    """Ctrl-C mid-run still calls on_train_end, and the history keeps the completed epochs."""
    recorder = Recorder()

    def interrupt(history):
        if len(history) == 2:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted during epoch 2"):
        history = vaelib.fit(tiny(), digits[0], epochs=5, callbacks=[recorder, interrupt], **OPTIONS)
    assert history.interrupted and history.epoch == [1, 2]
    assert recorder.calls == ["begin", "epoch 1", "epoch 2", "end"]
