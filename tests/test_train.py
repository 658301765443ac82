"""vaelib.fit on the digits: it learns, repeats exactly, resumes exactly, and refuses bad input."""

from __future__ import annotations

import pytest
import torch

import vaelib


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return vaelib.data.load_digits()


def small_vae(likelihood: str = "bernoulli") -> vaelib.VAE:
    torch.manual_seed(0)
    return vaelib.VAE.mlp(x_dim=64, z_dim=4, hidden=(32,), likelihood=likelihood)


def params(vae: vaelib.VAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def test_fit_raises_the_bound(digits):
    """Ten epochs raise the training ELBO by several nats and record the validation bound."""
    train, test = digits
    history = vaelib.fit(small_vae(), train, epochs=10, batch_size=50, lr=3e-3, valid_x=test, device="cpu")
    assert len(history) == 10 and history.epoch == list(range(1, 11))
    assert history.train_bound[-1] > history.train_bound[0] + 5
    assert history.valid_bound[-1] > history.valid_bound[0] + 5
    assert all(s > 0 for s in history.seconds)


def test_iwae_objective_trains(digits):
    """The IWAE objective with k = 5 also improves."""
    train, _ = digits
    history = vaelib.fit(small_vae(), train, objective="iwae", k=5, epochs=4, batch_size=100, lr=3e-3, device="cpu")
    assert history.objective == "iwae" and history.k == 5
    assert history.train_bound[-1] > history.train_bound[0]


def test_gaussian_likelihood_trains_on_unbounded_data(digits):
    """A Gaussian decoder accepts data outside [0, 1] and learns."""
    train, _ = digits
    history = vaelib.fit(small_vae("gaussian"), 4 * train - 1, epochs=3, lr=3e-3, device="cpu")
    assert history.train_bound[-1] > history.train_bound[0]


def test_same_seed_repeats_exactly(digits):
    """Two CPU runs with one seed end with bitwise equal parameters; another seed differs."""
    train, _ = digits
    runs = []
    for seed in (0, 0, 1):
        vae = small_vae()
        vaelib.fit(vae, train[:300], epochs=2, seed=seed, device="cpu")
        runs.append(params(vae))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_fit_leaves_the_global_random_state_alone(digits):
    """fit draws from its own seeded generators, not the caller's."""
    train, _ = digits
    vae = small_vae()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    vaelib.fit(vae, train[:200], epochs=1, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_resume_equals_uninterrupted(tmp_path, digits):
    """Stopping after 2 epochs and resuming to 4 ends bitwise where a 4-epoch run ends."""
    train, test = digits
    full = small_vae()
    h_full = vaelib.fit(full, train[:400], epochs=4, valid_x=test[:50], checkpoint=tmp_path / "a.pt", device="cpu")
    part = small_vae()
    vaelib.fit(part, train[:400], epochs=2, valid_x=test[:50], checkpoint=tmp_path / "b.pt", device="cpu")
    resumed = small_vae()
    h_res = vaelib.fit(
        resumed, train[:400], epochs=4, valid_x=test[:50], checkpoint=tmp_path / "b.pt", resume=True, device="cpu"
    )
    assert all(torch.equal(v, params(resumed)[k]) for k, v in params(full).items())
    assert h_res.train_bound == h_full.train_bound and h_res.valid_bound == h_full.valid_bound
    # The checkpoint is a loadable model too.
    loaded = vaelib.load(tmp_path / "b.pt")
    assert all(torch.equal(v, params(loaded)[k]) for k, v in params(full).items())


def test_resume_refuses_other_settings(tmp_path, digits):
    """Resuming with a different learning rate names the setting that changed."""
    train, _ = digits
    vaelib.fit(small_vae(), train[:200], epochs=1, checkpoint=tmp_path / "c.pt", device="cpu")
    with pytest.raises(ValueError, match="lr"):
        vaelib.fit(small_vae(), train[:200], epochs=2, lr=1e-2, checkpoint=tmp_path / "c.pt", resume=True, device="cpu")


def test_zero_epochs_is_a_no_op(digits):
    """epochs=0 trains nothing and returns an empty history."""
    vae = small_vae()
    before = params(vae)
    history = vaelib.fit(vae, digits[0], epochs=0, device="cpu")
    assert len(history) == 0
    assert all(torch.equal(v, params(vae)[k]) for k, v in before.items())


def test_history_plot(digits):
    """History.plot draws the training and validation curves with labelled axes."""
    import matplotlib

    matplotlib.use("Agg")
    history = vaelib.fit(small_vae(), digits[0][:200], epochs=2, valid_x=digits[1][:50], device="cpu")
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
        ("digits", {}, TypeError, "train_x: expected a torch.Tensor or numpy array"),
        (GOOD, {"k": 0}, ValueError, "k: expected an integer >= 1, got 0"),
        (GOOD, {"batch_size": 0}, ValueError, "batch_size: expected an integer >= 1"),
        (GOOD, {"epochs": -1}, ValueError, "epochs: expected an integer >= 0"),
        (GOOD, {"lr": 0.0}, ValueError, "lr: expected a finite number > 0"),
        (GOOD, {"lr": -1e-3}, ValueError, "lr: expected a finite number > 0"),
        (GOOD, {"objective": "elbo2"}, ValueError, "objective: expected one of 'elbo', 'iwae'"),
        (GOOD, {"matmul_precision": "low"}, ValueError, "matmul_precision: expected one of 'highest'"),
        (GOOD, {"device": "tpu"}, ValueError, "device: expected"),
        (GOOD, {"device": "cuda:3"} if not torch.cuda.is_available() else {"device": "tpu"}, ValueError, "device"),
        (GOOD, {"resume": True}, ValueError, "resume: resume=True needs a checkpoint"),
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
def test_training_steps_use_the_asked_matmul_precision(digits, precision):
    """Training steps run at matmul_precision; the validation bound and the caller keep their own setting."""
    train, test = digits
    plain = small_vae()
    encoder = PrecisionRecorder(plain.encoder)
    vae = vaelib.VAE(encoder, plain.decoder, x_dim=64, z_dim=4)
    encoder.seen.clear()  # the construction's dry run of the networks
    caller = "high"
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(caller)
    try:
        vaelib.fit(vae, train[:200], valid_x=test[:50], epochs=2, matmul_precision=precision, device="cpu")
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


def test_reduced_matmul_precision_barely_moves_the_bound(digits):
    """Per image, the ELBO with "medium" products (bfloat16 where the CPU has AMX) is within a
    hundredth of a nat of the float32 one on average, with the same noise for both (where there
    is no fast path the two are equal)."""
    train, test = digits
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(64, 8, hidden=(400,), activation="relu")
    vaelib.fit(vae, train, epochs=3, device="cpu", matmul_precision="highest")
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
