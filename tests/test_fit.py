"""fit (vaelib.training.fit): its research options, and how it fails: divergence, broken weights, interrupts."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

import vaelib
from vaelib.cli import main
from vaelib.data import bernoulli_draw
from vaelib.training.model_file import CheckpointError, read_checkpoint

X_DIM = 64


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    train, test = vaelib.data.load_digits()
    return train[:300], test[:100]


def tiny(likelihood: str = "bernoulli", seed: int = 0) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=(16,), likelihood=likelihood)


def weights(vae: vaelib.VAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


OPTIONS = {"device": "cpu", "progress": False, "batch_size": 50}


def test_callable_objective_equals_the_named_one(digits):
    """A callable computing the ELBO trains bitwise as objective="elbo" does; the IWAE likewise."""
    train, _ = digits
    for name, fn in [
        ("elbo", lambda vae, x: vae.elbo(x)),
        (vaelib.IWAE(k=3), lambda vae, x: vae.iwae(x, k=3)),
    ]:
        a, b = tiny(), tiny()
        ha = vaelib.fit(a, train, objective=name, epochs=2, **OPTIONS)
        hb = vaelib.fit(b, train, objective=fn, epochs=2, **OPTIONS)
        assert same(weights(a), weights(b))
        assert ha.train_bound == hb.train_bound
        assert hb.objective == "test_callable_objective_equals_the_named_one.<locals>.<lambda>"


def test_objective_of_the_wrong_shape_is_named(digits):
    """An objective returning one number per batch (not per point) raises a ValueError naming it."""
    with pytest.raises(ValueError, match=r"objective: expected a bound per data point of shape \(50,\), got \(\)"):
        vaelib.fit(tiny(), digits[0], objective=lambda vae, x: vae.elbo(x).mean(), epochs=1, **OPTIONS)


def test_default_k_fits_the_objective(digits):
    """objective="iwae" defaults to k = 5; an explicit k = 1 warns that it is the ELBO."""
    history = vaelib.fit(tiny(), digits[0][:100], objective="iwae", epochs=1, **OPTIONS)
    assert history.k == 5
    assert vaelib.fit(tiny(), digits[0][:100], epochs=1, **OPTIONS).k == 1
    with pytest.warns(UserWarning, match=r"IWAE\(k=1\) is the ELBO"):
        vaelib.fit(tiny(), digits[0][:100], objective=vaelib.IWAE(k=1), epochs=1, **OPTIONS)


def test_optimizer_factory_is_used(digits):
    """SGD at learning rate 0 leaves the weights exactly as they were; at 0.1 it moves them."""
    before = weights(tiny())
    frozen, moved = tiny(), tiny()
    vaelib.fit(frozen, digits[0], optimizer=lambda p: torch.optim.SGD(p, lr=0.0), epochs=2, **OPTIONS)
    vaelib.fit(moved, digits[0], optimizer=lambda p: torch.optim.SGD(p, lr=0.1), epochs=2, **OPTIONS)
    assert same(weights(frozen), before)
    assert not same(weights(moved), before)


def test_scheduler_steps_once_per_epoch(digits):
    """StepLR halving every epoch: the logged learning rates are 1e-3 / 2^epoch."""
    rates = []
    lrs = []

    class LR(vaelib.training.callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            lrs.append(logs["lr"])
            return False

    vaelib.fit(
        tiny(),
        digits[0],
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        callbacks=[LR(), lambda h: rates.append(h.epoch[-1])],
        epochs=3,
        **OPTIONS,
    )
    assert rates == [1, 2, 3]
    assert lrs == pytest.approx([1e-3 / 2, 1e-3 / 4, 1e-3 / 8], rel=1e-12)


def test_resume_with_a_scheduler_equals_uninterrupted(tmp_path, digits):
    """A cosine schedule resumed after 2 of 4 epochs ends bitwise where the 4-epoch run ends."""
    train, test = digits
    options = {
        **OPTIONS,
        "scheduler": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        "grad_clip": 5.0,
        "valid_x": test,
    }
    full, part = tiny(), tiny()
    h_full = vaelib.fit(full, train, epochs=4, **options)
    vaelib.fit(part, train, epochs=2, checkpoint=tmp_path / "c.pt", **options)
    resumed = tiny()
    h_res = vaelib.fit(resumed, train, epochs=4, checkpoint=tmp_path / "c.pt", if_exists="resume", **options)
    assert same(weights(full), weights(resumed))
    assert h_full.train_bound == h_res.train_bound


class NormRecorder(torch.optim.SGD):
    """SGD that notes the total gradient norm it is given at every step."""

    norms: list[float]

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return super().step(closure)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_grad_clip_bounds_the_gradient_norm(digits, clip):
    """With grad_clip=1 no step sees a norm above 1; without it, the norms exceed 1 (so the check can fail)."""
    NormRecorder.norms = []
    vaelib.fit(tiny(), digits[0], optimizer=lambda p: NormRecorder(p, lr=1e-2), grad_clip=clip, epochs=2, **OPTIONS)
    assert len(NormRecorder.norms) == 12
    if clip is None:
        assert max(NormRecorder.norms) > 2.0
    else:
        assert max(NormRecorder.norms) <= clip * (1 + 1e-5)


class InputRecorder(torch.nn.Module):
    """Wraps a network and keeps the distinct values of the inputs it sees while training."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.values: set[float] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.values |= set(x.unique().tolist())
        return self.net(x)


@pytest.mark.parametrize("binarize", [None, False])
def test_binarize_can_be_turned_off(digits, binarize):
    """By default a Bernoulli model trains on 0/1 draws; binarize=False gives it the grey values."""
    plain = tiny()
    encoder = InputRecorder(plain.encoder)
    vae = vaelib.VAE(encoder, plain.decoder, x_dim=X_DIM, z_dim=2)
    vaelib.fit(vae, digits[0], binarize=binarize, epochs=1, **OPTIONS)
    if binarize is None:
        assert encoder.values == {0.0, 1.0}
    else:
        assert len(encoder.values) > 2 and encoder.values <= set(digits[0].unique().tolist())


def test_valid_every_and_the_last_epoch(digits):
    """valid_every=3 over 7 epochs scores the validation data after epochs 3, 6 and 7."""
    history = vaelib.fit(tiny(), digits[0], valid_x=digits[1], valid_every=3, epochs=7, **OPTIONS)
    assert [e for e, v in zip(history.epoch, history.valid_bound, strict=True) if v is not None] == [3, 6, 7]


def test_valid_k_scores_with_the_iwae_bound(digits):
    """valid_k=200 records the IWAE bound of the (once-binarized) validation data: within 4 standard
    errors of an independent IWAE estimate, and more than 4 standard errors above the ELBO."""
    train, test = digits
    vae = tiny()
    history = vaelib.fit(vae, train, valid_x=test, epochs=3, valid_objective=vaelib.IWAE(k=200), **OPTIONS)
    x = bernoulli_draw(test, torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    with torch.no_grad():
        iwae = torch.stack([vae.iwae(x, k=200).mean() for _ in range(20)]).double()  # (20,)
        elbo = torch.stack([vae.elbo(x, k=1).mean() for _ in range(200)]).double()  # (200,)
    se_iwae = float(iwae.std() / math.sqrt(20))
    se_gap = math.hypot(se_iwae, float(elbo.std() / math.sqrt(200)))
    assert abs(history.valid_bound[-1] - float(iwae.mean())) < 4 * math.hypot(se_iwae, se_iwae * math.sqrt(20))
    assert history.valid_bound[-1] - float(elbo.mean()) > 4 * se_gap


def test_epochs_are_logged_outside_a_terminal(digits, caplog):
    """Without a progress bar, each epoch is one INFO line of the vaelib.training logger."""
    with caplog.at_level(logging.INFO, logger="vaelib.training"):
        vaelib.fit(tiny(), digits[0], valid_x=digits[1], epochs=3, **OPTIONS)
    lines = [r.getMessage() for r in caplog.records if r.name == "vaelib.training"]
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/3: train elbo ") and "valid" in lines[0] and "nats" in lines[0]


def test_host_syncs_do_not_grow_with_the_number_of_steps(monkeypatch, digits):
    """The host reads device values a fixed number of times per epoch, however many batches it has,
    with clipping, a scheduler and a callable objective on."""
    reads = {"n": 0}
    for method in ("__float__", "__bool__", "item", "tolist", "__int__"):
        real = getattr(torch.Tensor, method)

        def counted(self, *args, _real=real, **kwargs):
            reads["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    counts = []
    for batch_size in (100, 25):
        reads["n"] = 0
        vaelib.fit(
            tiny(),
            digits[0],
            objective=lambda vae, x: vae.elbo(x),
            grad_clip=1.0,
            scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1),
            epochs=2,
            batch_size=batch_size,
            device="cpu",
            progress=False,
        )
        counts.append(reads["n"])
    assert counts[0] == counts[1]
    assert counts[0] <= 3 + 2 * 2  # the data check, then per epoch the bound and the finiteness check


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"grad_clip": 0.0}, ValueError, "grad_clip: expected a finite number > 0"),
        ({"valid_every": 0}, ValueError, "valid_every: expected an integer >= 1"),
        ({"valid_objective": "iwae2", "valid_x": torch.rand(5, X_DIM)}, ValueError, "valid_objective: expected one of"),
        ({"callbacks": [vaelib.EarlyStopping(patience=2)]}, ValueError, "valid_x: EarlyStopping watches"),
        ({"valid_k": 3}, TypeError, r"valid_k= is no longer a keyword; use valid_objective=vaelib.IWAE\(k=3\)"),
        ({"patience": 2}, TypeError, r"use callbacks=\[vaelib.EarlyStopping\(patience=2\)\]"),
        ({"optimizer": lambda p: torch.optim.SGD(p, lr=0.1), "lr": 0.1}, ValueError, "lr: set the learning rate"),
        ({"k": 3}, TypeError, r"k= is no longer a keyword; use objective=vaelib.IWAE\(k=3\)"),
        ({"objective": "iwae5"}, ValueError, "objective: expected one of 'elbo', 'iwae'"),
        ({"optimizer": lambda p: 3}, TypeError, "optimizer: the factory must return"),
        ({"scheduler": lambda o: None}, TypeError, "scheduler: the factory must return"),
        ({"callbacks": [3]}, TypeError, "callbacks: expected Callbacks or functions of the history"),
    ],
)
def test_bad_options_are_refused(kwargs, error, message):
    """Each bad option raises an error naming it, and the model is unchanged."""
    vae = tiny()
    before = weights(vae)
    with pytest.raises(error, match=message):
        vaelib.fit(vae, torch.rand(20, X_DIM).round(), epochs=1, **{"device": "cpu", "progress": False, **kwargs})
    assert same(weights(vae), before)


def test_binarize_needs_a_bernoulli_likelihood():
    """binarize=True on a Gaussian model is refused."""
    with pytest.raises(ValueError, match="binarize: dynamic binarization applies to a Bernoulli"):
        vaelib.fit(tiny("gaussian"), torch.rand(20, X_DIM), binarize=True, epochs=1, device="cpu")


def test_reduce_on_plateau_watches_the_negated_bound(digits):
    """A ReduceLROnPlateau is stepped with minus the validation bound (it minimizes a loss), or minus the
    training bound in epochs without validation."""
    seen = []

    class Recording(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics, epoch=None):
            seen.append(float(metrics))
            return super().step(metrics)

    history = vaelib.fit(
        tiny(),
        digits[0],
        valid_x=digits[1],
        valid_every=2,
        scheduler=lambda o: Recording(o, patience=0),
        epochs=3,
        **OPTIONS,
    )
    expected = [-(v if v is not None else t) for t, v in zip(history.train_bound, history.valid_bound, strict=True)]
    assert seen == expected


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_estimator_trains_as_its_surrogate_does(digits, estimator):
    """IWAE(estimator=...) trains bitwise as the estimator's surrogate passed as a function does."""
    train, _ = digits
    named, by_hand, reparam = tiny(), tiny(), tiny()
    vaelib.fit(named, train, objective=vaelib.IWAE(k=4, estimator=estimator), epochs=2, **OPTIONS)

    def surrogate(vae, x):
        return vaelib.iwae_surrogate(x, vae.encode(x), vae, 4, estimator=estimator)

    vaelib.fit(by_hand, train, objective=surrogate, epochs=2, **OPTIONS)
    vaelib.fit(reparam, train, objective=vaelib.IWAE(k=4), epochs=2, **OPTIONS)
    assert same(weights(named), weights(by_hand))
    # Only the encoder's gradient differs between the estimators, so the encoders part ways.
    assert not same(weights(named), weights(reparam))


def test_resume_refuses_another_estimator(tmp_path, digits):
    """The estimator is part of the run's configuration: a resume with another one is refused."""
    path = tmp_path / "run.pt"
    vaelib.fit(tiny(), digits[0], objective=vaelib.IWAE(k=3, estimator="dreg"), epochs=1, checkpoint=path, **OPTIONS)
    with pytest.raises(vaelib.CheckpointError):
        vaelib.fit(
            tiny(), digits[0], objective=vaelib.IWAE(k=3), epochs=2, checkpoint=path, if_exists="resume", **OPTIONS
        )
    history = vaelib.fit(
        tiny(),
        digits[0],
        objective=vaelib.IWAE(k=3, estimator="dreg"),
        epochs=2,
        checkpoint=path,
        if_exists="resume",
        **OPTIONS,
    )
    assert len(history) == 2


@pytest.fixture(scope="module")
def train_digits() -> torch.Tensor:
    return vaelib.data.load_digits()[0][:300]


def tiny_vae(likelihood: str = "bernoulli", hidden: tuple[int, ...] = (8,), seed: int = 0, **kw) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=hidden, likelihood=likelihood, **kw)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def _interrupt(opt: torch.optim.Optimizer) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_images_train_and_score_finitely(value, train_digits):
    """Images all zero or all one: training and every bound stay finite."""
    x = torch.full((200, X_DIM), value)
    vae = tiny_vae()
    history = vaelib.fit(vae, x, epochs=3, batch_size=50, lr=1e-2, device="cpu", progress=False)
    assert all(math.isfinite(b) for b in history.train_bound)
    for bound in (vae.elbo(x, k=4), vae.elbo(x, analytic_kl=True), vae.iwae(x, k=16)):
        assert torch.isfinite(bound).all()
    assert torch.isfinite(vaelib.log_likelihood(vae, x, k=64, progress=False)).all()


def test_diverging_learning_rate_stops_with_the_epoch_named(tmp_path):
    """lr = 1000 on a Gaussian decoder: TrainingDiverged names the epoch; the model and the last
    checkpoint are the previous epoch's, finite, and exactly those of a run that stopped there."""
    x = vaelib.data.load_digits()[0]
    path = tmp_path / "checkpoint.pt"
    vae = tiny_vae("gaussian", hidden=(16,), activation="relu")
    options = {"batch_size": 1500, "lr": 1000.0, "device": "cpu", "progress": False}
    with pytest.raises(vaelib.TrainingDiverged, match=r"diverged in epoch 2: .* restored to epoch 1; the checkpoint"):
        vaelib.fit(vae, x, epochs=5, checkpoint=path, **options)
    one_epoch = tiny_vae("gaussian", hidden=(16,), activation="relu")
    vaelib.fit(one_epoch, x, epochs=1, **options)
    saved = vaelib.load(path)
    assert read_checkpoint(path)["epoch"] == 1
    assert same_weights(saved.state_dict(), one_epoch.state_dict())
    assert same_weights(vae.state_dict(), one_epoch.state_dict())
    assert all(torch.isfinite(p).all() for p in saved.parameters())


@pytest.mark.parametrize("step", [32, 36], ids=["mid-epoch", "last-step-of-epoch"])
def test_weights_broken_within_an_epoch_are_caught(monkeypatch, tmp_path, train_digits, step):
    """NaN weights after step 32 (mid epoch 3, at 12 steps an epoch) or step 36 (the last of epoch 3,
    after its bounds were taken): TrainingDiverged for epoch 3, and the checkpoint stays at epoch 2."""
    path = tmp_path / "checkpoint.pt"
    _StepHook(monkeypatch, step, _poison)
    vae = tiny_vae()
    with pytest.raises(vaelib.TrainingDiverged, match="diverged in epoch 3"):
        vaelib.fit(vae, train_digits, epochs=5, batch_size=25, checkpoint=path, device="cpu", progress=False)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 2
    two_epochs = tiny_vae()
    vaelib.fit(two_epochs, train_digits, epochs=2, batch_size=25, device="cpu", progress=False)
    assert same_weights(vaelib.load(path).state_dict(), two_epochs.state_dict())
    assert same_weights(vae.state_dict(), two_epochs.state_dict())


def test_keyboard_interrupt_mid_epoch(monkeypatch, tmp_path, train_digits):
    """Ctrl-C in the middle of epoch 3: fit returns the history of 2 epochs, marked interrupted, with
    the model exactly as after epoch 2; resuming from the checkpoint then matches an uninterrupted run."""
    path = tmp_path / "checkpoint.pt"
    options = {"batch_size": 25, "device": "cpu", "progress": False}
    _StepHook(monkeypatch, 2 * 12 + 5, _interrupt)  # 12 steps per epoch
    vae = tiny_vae()
    with pytest.warns(UserWarning, match="interrupted during epoch 3; the model is as it was after epoch 2"):
        history = vaelib.fit(vae, train_digits, epochs=4, checkpoint=path, **options)
    monkeypatch.undo()
    assert history.interrupted and history.epoch == [1, 2] and len(history.train_bound) == 2
    two, four = tiny_vae(), tiny_vae()
    reference = vaelib.fit(two, train_digits, epochs=2, **options)
    assert history.train_bound == reference.train_bound
    assert same_weights(vae.state_dict(), two.state_dict())
    resumed = vaelib.fit(vae, train_digits, epochs=4, checkpoint=path, if_exists="resume", **options)
    vaelib.fit(four, train_digits, epochs=4, **options)
    assert resumed.epoch == [1, 2, 3, 4] and not resumed.interrupted
    assert same_weights(vae.state_dict(), four.state_dict())


def test_keyboard_interrupt_in_the_callback(train_digits):
    """Ctrl-C while the callback runs after epoch 2: the epoch is complete, so it is kept."""

    def callback(history):
        if len(history) == 2:
            raise KeyboardInterrupt

    vae, two = tiny_vae(), tiny_vae()
    with pytest.warns(UserWarning, match="interrupted during epoch 2; the model is as it was after epoch 2"):
        history = vaelib.fit(vae, train_digits, epochs=5, device="cpu", progress=False, callbacks=[callback])
    assert history.interrupted and history.epoch == [1, 2]
    vaelib.fit(two, train_digits, epochs=2, device="cpu", progress=False)
    assert same_weights(vae.state_dict(), two.state_dict())


TINY = ["--hidden", "8", "--z-dim", "2", "--test-k", "2", "--batch-size", "500"]


def run(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


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
    "analytic_kl gone": ({"analytic_kl": True}, TypeError, r"use objective=vaelib.ELBO\(analytic_kl=True\)"),
    "if_exists str": ({"if_exists": "yes"}, ValueError, r"^if_exists: expected one of 'error', 'resume'"),
    "resume gone": ({"resume": True}, TypeError, r"resume= is no longer a keyword; use if_exists='resume'"),
    "callback gone": ({"callback": print}, TypeError, r"callback= is no longer a keyword; use callbacks=\[f\]"),
    "objective type": ({"objective": 3}, TypeError, r"^objective: "),
    "grad data": ({"train_x": "grad"}, ValueError, r"^train_x: expected data that do not require grad"),
    "no parameters": ({"vae": "empty"}, ValueError, r"^vae: the model has no trainable parameters"),
}


def test_fit_refuses_to_replace_a_checkpoint_without_resume_or_overwrite(tmp_path, train_digits):
    path = tmp_path / "checkpoint.pt"
    vaelib.fit(tiny_vae(), train_digits, epochs=2, checkpoint=path, progress=False)
    before = path.read_bytes()
    with pytest.raises(
        ValueError, match=r"^checkpoint: .* already exists; pass if_exists='resume' .* if_exists='overwrite'"
    ):
        vaelib.fit(tiny_vae(), train_digits, epochs=1, checkpoint=path, progress=False)
    assert path.read_bytes() == before
    vaelib.fit(tiny_vae(), train_digits, epochs=1, checkpoint=path, progress=False, if_exists="overwrite")
    assert read_checkpoint(path)["epoch"] == 1


def test_resume_with_another_activation_is_refused(tmp_path, train_digits):
    path = tmp_path / "checkpoint.pt"
    vaelib.fit(tiny_vae(activation="tanh"), train_digits, epochs=1, checkpoint=path, progress=False)
    relu = tiny_vae(activation="relu")
    before = {k: v.clone() for k, v in relu.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"another architecture \(saved, now\): \{'activation': \('tanh', 'relu'\)"
    ):
        vaelib.fit(relu, train_digits, epochs=2, checkpoint=path, progress=False, if_exists="resume")
    assert all(torch.equal(before[k], v) for k, v in relu.state_dict().items())


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_refuses_bad_arguments_before_any_work(case, tmp_path, train_digits):
    kwargs, error, message = FIT_CASES[case]
    kwargs = dict(kwargs)
    vae = tiny_vae()
    if kwargs.pop("vae", None) == "empty":
        vae = vaelib.VAE(_Empty(), _EmptyDecoder(), x_dim=X_DIM, z_dim=2)
    x = train_digits.clone().requires_grad_(True) if kwargs.pop("train_x", None) == "grad" else train_digits
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(error, match=message):
        vaelib.fit(vae, x, epochs=1, checkpoint=tmp_path / "c.pt", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == [] and x.grad is None
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_interrupt_during_a_checkpoint_write_rolls_back_that_epoch(tmp_path, monkeypatch, train_digits, capsys):
    """Ctrl-C inside epoch 2's checkpoint write: the history, the model and the message say epoch 1,
    which is what the checkpoint on disk holds."""
    real, calls = vaelib.training.loop.write_training_checkpoint, [0]

    def write(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vaelib.training.loop, "write_training_checkpoint", write)
    path = tmp_path / "checkpoint.pt"
    vae = tiny_vae()
    with pytest.warns(UserWarning, match="interrupted during epoch 2; the model is as it was after epoch 1"):
        history = vaelib.fit(vae, train_digits, epochs=3, checkpoint=path, progress=False)
    assert history.interrupted and history.epoch == [1]
    saved = vaelib.load(path)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), vae.state_dict().values(), strict=True))
    calls[0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(["train", *TINY, "--epochs", "3", "--out", tmp_path / "cli"]) == 130
    assert capsys.readouterr().err.endswith("interrupted after epoch 1; add --resume to continue\n")
    assert read_checkpoint(tmp_path / "cli" / "checkpoint.pt")["epoch"] == 1


# On the whole digits: it learns, repeats exactly, resumes exactly, and refuses bad input.


@pytest.fixture(scope="module")
def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole embedded data set, train and test."""
    return vaelib.data.load_digits()


def small_vae(likelihood: str = "bernoulli") -> vaelib.VAE:
    torch.manual_seed(0)
    return vaelib.VAE.mlp(x_dim=64, z_dim=4, hidden=(32,), likelihood=likelihood)


def params(vae: vaelib.VAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def test_fit_raises_the_bound(all_digits):
    """Ten epochs raise the training ELBO by several nats and record the validation bound."""
    train, test = all_digits
    history = vaelib.fit(small_vae(), train, epochs=10, batch_size=50, lr=3e-3, valid_x=test, device="cpu")
    assert len(history) == 10 and history.epoch == list(range(1, 11))
    assert history.train_bound[-1] > history.train_bound[0] + 5
    assert history.valid_bound[-1] > history.valid_bound[0] + 5
    assert all(s > 0 for s in history.seconds)


def test_iwae_objective_trains(all_digits):
    """The IWAE objective with k = 5 also improves."""
    train, _ = all_digits
    history = vaelib.fit(
        small_vae(), train, objective=vaelib.IWAE(k=5), epochs=4, batch_size=100, lr=3e-3, device="cpu"
    )
    assert history.objective == "iwae" and history.k == 5
    assert history.train_bound[-1] > history.train_bound[0]


def test_gaussian_likelihood_trains_on_unbounded_data(all_digits):
    """A Gaussian decoder accepts data outside [0, 1] and learns."""
    train, _ = all_digits
    history = vaelib.fit(small_vae("gaussian"), 4 * train - 1, epochs=3, lr=3e-3, device="cpu")
    assert history.train_bound[-1] > history.train_bound[0]


def test_same_seed_repeats_exactly(all_digits):
    """Two CPU runs with one seed end with bitwise equal parameters; another seed differs."""
    train, _ = all_digits
    runs = []
    for seed in (0, 0, 1):
        vae = small_vae()
        vaelib.fit(vae, train[:300], epochs=2, seed=seed, device="cpu")
        runs.append(params(vae))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_fit_leaves_the_global_random_state_alone(all_digits):
    """fit draws from its own seeded generators, not the caller's."""
    train, _ = all_digits
    vae = small_vae()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    vaelib.fit(vae, train[:200], epochs=1, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_resume_equals_uninterrupted(tmp_path, all_digits):
    """Stopping after 2 epochs and resuming to 4 ends bitwise where a 4-epoch run ends."""
    train, test = all_digits
    full = small_vae()
    h_full = vaelib.fit(full, train[:400], epochs=4, valid_x=test[:50], checkpoint=tmp_path / "a.pt", device="cpu")
    part = small_vae()
    vaelib.fit(part, train[:400], epochs=2, valid_x=test[:50], checkpoint=tmp_path / "b.pt", device="cpu")
    resumed = small_vae()
    h_res = vaelib.fit(
        resumed,
        train[:400],
        epochs=4,
        valid_x=test[:50],
        checkpoint=tmp_path / "b.pt",
        device="cpu",
        if_exists="resume",
    )
    assert all(torch.equal(v, params(resumed)[k]) for k, v in params(full).items())
    assert h_res.train_bound == h_full.train_bound and h_res.valid_bound == h_full.valid_bound
    # The checkpoint is a loadable model too.
    loaded = vaelib.load(tmp_path / "b.pt")
    assert all(torch.equal(v, params(loaded)[k]) for k, v in params(full).items())


def test_resume_refuses_other_settings(tmp_path, all_digits):
    """Resuming with a different learning rate names the setting that changed."""
    train, _ = all_digits
    vaelib.fit(small_vae(), train[:200], epochs=1, checkpoint=tmp_path / "c.pt", device="cpu")
    with pytest.raises(ValueError, match="lr"):
        vaelib.fit(
            small_vae(), train[:200], epochs=2, lr=1e-2, checkpoint=tmp_path / "c.pt", device="cpu", if_exists="resume"
        )


def test_zero_epochs_is_a_no_op(all_digits):
    """epochs=0 trains nothing and returns an empty history."""
    vae = small_vae()
    before = params(vae)
    history = vaelib.fit(vae, all_digits[0], epochs=0, device="cpu")
    assert len(history) == 0
    assert all(torch.equal(v, params(vae)[k]) for k, v in before.items())


def test_history_plot(all_digits):
    """History.plot draws the training and validation curves with labelled axes."""
    import matplotlib

    matplotlib.use("Agg")
    history = vaelib.fit(small_vae(), all_digits[0][:200], epochs=2, valid_x=all_digits[1][:50], device="cpu")
    ax = history.plot()
    assert len(ax.get_lines()) == 2
    assert ax.get_xlabel() == "epoch" and "nats" in ax.get_ylabel()


GOOD = torch.rand(20, 64)


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "message"),
    [
        (GOOD * 2, {}, ValueError, r"train_x: a Bernoulli likelihood needs values in \[0, 1\]"),
        (torch.full((5, 64), float("nan")), {}, ValueError, "train_x: expected finite values"),
        (torch.full((5, 64), float("inf")), {}, ValueError, "train_x: expected finite values"),
        (torch.rand(5, 10), {}, ValueError, "train_x: expected 64 features per row"),
        (torch.rand(0, 64), {}, ValueError, "train_x: expected at least one row"),
        (torch.rand(64), {}, ValueError, "train_x: expected a 2-d array"),
        ("all_digits", {}, TypeError, "train_x: expected a torch.Tensor or numpy array"),
        (GOOD, {"batch_size": 0}, ValueError, "batch_size: expected an integer >= 1"),
        (GOOD, {"epochs": -1}, ValueError, "epochs: expected an integer >= 0"),
        (GOOD, {"lr": 0.0}, ValueError, "lr: expected a finite number > 0"),
        (GOOD, {"lr": -1e-3}, ValueError, "lr: expected a finite number > 0"),
        (GOOD, {"objective": "elbo2"}, ValueError, "objective: expected one of 'elbo', 'iwae'"),
        (GOOD, {"matmul_precision": "high"}, TypeError, r"use with vaelib.training_precision\('high'\)"),
        (GOOD, {"device": "tpu"}, ValueError, "device: expected"),
        (GOOD, {"device": "cuda:3"} if not torch.cuda.is_available() else {"device": "tpu"}, ValueError, "device"),
        (GOOD, {"if_exists": "resume"}, ValueError, "if_exists: 'resume' needs a checkpoint path"),
        (GOOD, {"valid_x": torch.rand(3, 8)}, ValueError, "valid_x: expected 64 features"),
    ],
)
def test_bad_input_is_refused_before_any_work(data, kwargs, error, message):
    """Each bad argument raises an error naming it, and the model is left untouched."""
    vae = small_vae()
    before = params(vae)
    with pytest.raises(error, match=message):
        vaelib.fit(vae, data, **{"epochs": 1, **kwargs})
    assert all(torch.equal(v, params(vae)[k]) for k, v in before.items())


class PrecisionRecorder(torch.nn.Module):
    """Wraps a network and notes, at every call, whether gradients are on and the float32 matmul precision."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: set[tuple[bool, str]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add((torch.is_grad_enabled(), torch.get_float32_matmul_precision()))
        return self.net(x)


@pytest.mark.parametrize("precision", ["medium", "highest"])
def test_training_steps_use_the_asked_matmul_precision(all_digits, precision):
    """Training steps run at training_precision's; the validation bound and the caller keep their own setting."""
    train, test = all_digits
    plain = small_vae()
    encoder = PrecisionRecorder(plain.encoder)
    vae = vaelib.VAE(encoder, plain.decoder, x_dim=64, z_dim=4)
    encoder.seen.clear()  # the construction's dry run of the networks
    caller = "high"
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(caller)
    try:
        with vaelib.training_precision(precision):
            vaelib.fit(vae, train[:200], valid_x=test[:50], epochs=2, device="cpu")
        assert torch.get_float32_matmul_precision() == caller
    finally:
        torch.set_float32_matmul_precision(previous)
    assert encoder.seen == {(True, precision), (False, caller)}


def test_matmul_precision_is_restored_after_an_error():
    """An exception inside the block leaves the caller's precision in place."""
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError, match="inside"), vaelib._runtime.devices.float32_matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == before


def test_reduced_matmul_precision_barely_moves_the_bound(all_digits):
    """Per image, the ELBO with "medium" products (bfloat16 where the CPU has AMX) is within a
    hundredth of a nat of the float32 one on average, with the same noise for both (where there
    is no fast path the two are equal)."""
    train, test = all_digits
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(64, 8, hidden=(400,), activation="relu")
    with vaelib.training_precision("highest"):
        vaelib.fit(vae, train, epochs=3, device="cpu")
    x = vaelib.data.binarize(test, generator=torch.Generator().manual_seed(0))
    bounds = {}
    for precision in ("highest", "medium"):
        torch.manual_seed(1)
        with torch.no_grad(), vaelib._runtime.devices.float32_matmul_precision(precision):
            bounds[precision] = vae.elbo(x, k=10).double()
    difference = bounds["medium"] - bounds["highest"]
    assert difference.abs().mean() < 0.01
    assert difference.abs().max() < 0.1


def test_default_device_is_a_torch_device():
    """default_device returns cuda, mps or cpu."""
    assert vaelib.default_device().type in ("cuda", "mps", "cpu")
