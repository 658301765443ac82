"""vaelib.objectives: the objective values, their settings and schedules, and fit's use of them."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import vaelib
from vaelib._cli_parser import objective_from_args
from vaelib.cli import build_parser
from vaelib.objectives import (
    describe,
    epoch_objective,
    label,
    resolve,
    samples_per_point,
    settings_of,
    upgrade_settings,
    validation_objective,
)
from vaelib.training.checkpoint import write_training_checkpoint
from vaelib.training.fit import run_settings
from vaelib.training.history import History
from vaelib.training.model_file import CheckpointError


@pytest.fixture
def vae_and_x():
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(12, 3, (16,))
    x = torch.rand(40, 12)
    return vae, x


def _seeded(fn, seed=3):
    torch.manual_seed(seed)
    return fn()


def test_each_value_is_the_bound_it_names(vae_and_x):
    """Under one seed each value computes what the model's method (or the bound of its log weights) gives."""
    vae, x = vae_and_x
    pairs = [
        (vaelib.ELBO(k=3), lambda: vae.elbo(x, k=3)),
        (vaelib.ELBO(analytic_kl=True), lambda: vae.elbo(x, analytic_kl=True)),
        (vaelib.IWAE(k=4), lambda: vae.iwae(x, k=4)),
        (vaelib.IWAE(k=4, estimator="dreg"), lambda: vae.iwae(x, k=4)),
        (vaelib.IWAE(k=4, estimator="stl"), lambda: vae.iwae(x, k=4)),
        (vaelib.Renyi(0.0, k=4), lambda: vae.iwae(x, k=4)),  # alpha = 0 is the IWAE bound
        (vaelib.Renyi(0.5, k=4), lambda: vaelib.renyi_from_log_weights(vae.log_weights(x, 4), 0.5)),
        (vaelib.BetaELBO(), lambda: vae.elbo(x, analytic_kl=True)),  # beta = 1: the ELBO, KL in closed form
    ]
    for objective, reference in pairs:
        got, want = _seeded(lambda o=objective: o(vae, x)), _seeded(reference)
        assert got.shape == (40,)
        assert torch.allclose(got, want, atol=1e-6), objective


def test_the_renyi_bound_lies_between_the_iwae_bound_and_the_elbo(vae_and_x):
    """For the same draws L_alpha falls with alpha from L_k (alpha = 0) towards the mean log weight."""
    vae, x = vae_and_x
    values = [_seeded(lambda a=a: vaelib.Renyi(a, k=6)(vae, x)) for a in (0.0, 0.5, 0.999)]
    elbo = _seeded(lambda: vae.log_weights(x, 6).mean(dim=0))
    assert (values[0] >= values[1] - 1e-9).all() and (values[1] >= values[2] - 1e-9).all()
    assert torch.allclose(values[2], elbo, atol=0.05)


def test_beta_weights_the_kl_term(vae_and_x):
    """-(D + beta R) at two betas differ by (beta_2 - beta_1) R, R the closed-form KL."""
    vae, x = vae_and_x
    kl = torch.distributions.kl_divergence(vae.encode(x), vae.prior)  # (batch,)
    low, high = (_seeded(lambda b=b: vaelib.BetaELBO(beta=b)(vae, x)) for b in (0.5, 2.0))
    assert torch.allclose(low - high, 1.5 * kl, atol=1e-5)


def test_fields_are_checked_where_they_are_written():
    with pytest.raises(ValueError, match=r"k: expected an integer >= 1"):
        vaelib.IWAE(k=0)
    with pytest.raises(ValueError, match="estimator"):
        vaelib.IWAE(estimator="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        vaelib.Renyi(1.0)
    with pytest.raises(ValueError, match="beta"):
        vaelib.BetaELBO(beta=-1.0)
    with pytest.raises(TypeError, match="beta"):
        vaelib.BetaELBO(beta=float("nan"))
    with pytest.raises(ValueError, match=r"schedule: .* leave beta and warmup_epochs unset"):
        vaelib.BetaELBO(beta=2.0, schedule=lambda e: 1.0)
    with pytest.raises(TypeError, match="schedule"):
        vaelib.BetaELBO(schedule=3)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match=r"IWAE\(k=1\) is the ELBO"):
        vaelib.IWAE(k=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vaelib.IWAE().k = 3  # type: ignore[misc]


def test_settings_name_the_class_and_every_field():
    assert vaelib.IWAE(k=7, estimator="dreg").settings() == {"name": "IWAE", "k": 7, "estimator": "dreg"}
    assert vaelib.ELBO().settings() == {"name": "ELBO", "k": 1, "analytic_kl": False}
    assert vaelib.Renyi(0.25).settings() == {"name": "Renyi", "alpha": 0.25, "k": 5}

    def warm(epoch: int) -> float:
        return 1.0

    assert vaelib.BetaELBO(schedule=warm).settings()["schedule"].endswith("warm")
    assert describe(vaelib.IWAE(k=7).settings()) == "IWAE(k=7, estimator='reparam')"
    assert settings_of(warm) == {"name": warm.__qualname__, "function": True}
    assert vaelib.IWAE(k=3) == vaelib.IWAE(k=3) and vaelib.IWAE(k=3) != vaelib.IWAE(k=4)


def test_shorthands_and_helpers():
    assert resolve("elbo") == vaelib.ELBO() and resolve("iwae") == vaelib.IWAE(k=5)
    with pytest.raises(ValueError, match="objective: expected one of 'elbo', 'iwae'"):
        resolve("elbo2")
    with pytest.raises(TypeError, match=r"objective: expected .*vaelib.IWAE\(k=5\)"):
        resolve(3)
    assert [label(o) for o in (vaelib.ELBO(), vaelib.IWAE(), vaelib.BetaELBO(), vaelib.Renyi(0.5))] == [
        "elbo",
        "iwae",
        "beta-elbo",
        "renyi",
    ]
    assert samples_per_point(vaelib.Renyi(0.5, k=9)) == 9 and samples_per_point(lambda m, x: x) == 1
    assert validation_objective(vaelib.BetaELBO(beta=4.0, k=2)) == vaelib.ELBO(k=2)
    assert validation_objective(vaelib.IWAE(k=3)) == vaelib.IWAE(k=3)


@pytest.mark.parametrize("epoch", [1, 2, 3, 4, 5, 9])
def test_warm_up_weight_per_epoch(epoch):
    """beta_e = beta min(1, (e - 1) / E) (Bowman et al. 2016); a schedule gives it directly."""
    warm = vaelib.BetaELBO(beta=2.0, warmup_epochs=4, free_bits=0.1)
    this = epoch_objective(warm, epoch)
    assert this == vaelib.BetaELBO(beta=2.0 * min(1.0, (epoch - 1) / 4), free_bits=0.1)
    assert epoch_objective(vaelib.BetaELBO(schedule=lambda e: 0.5 * e), epoch).beta == 0.5 * epoch
    assert epoch_objective(vaelib.IWAE(k=3), epoch) == vaelib.IWAE(k=3)


def test_fit_trains_on_the_epoch_weight():
    """One epoch of warm-up trains at weight 0: bit for bit the run of BetaELBO(beta=0)."""
    data = torch.rand(60, 12)
    weights = []
    for objective in (vaelib.BetaELBO(warmup_epochs=3), vaelib.BetaELBO(beta=0.0), vaelib.BetaELBO()):
        torch.manual_seed(0)
        vae = vaelib.VAE.mlp(12, 3, (16,))
        vaelib.fit(vae, data, objective=objective, epochs=1, batch_size=20, progress=False, device="cpu")
        weights.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])  # the weight matters: the check can fail


def test_fit_takes_at_most_twenty_parameters_and_gives_directions():
    assert len(inspect.signature(vaelib.fit).parameters) <= 20
    vae = vaelib.VAE.mlp(12, 3, (16,))
    with pytest.raises(TypeError, match=r"k= is no longer a keyword; use objective=vaelib\.IWAE\(k=5\)"):
        vaelib.fit(vae, torch.rand(10, 12), k=5)
    cases = {
        "beta": r"vaelib\.BetaELBO\(beta=2\.0\)",
        "resume": r"if_exists='resume'",
        "valid_k": r"valid_objective=vaelib\.IWAE\(k=True\)",
        "patience": r"vaelib\.EarlyStopping\(patience=",
        "matmul_precision": r"vaelib\.training_precision",
        "callback": r"callbacks=\[f\]",
    }
    for key, pattern in cases.items():
        with pytest.raises(TypeError, match=pattern):
            vaelib.fit(vae, torch.rand(10, 12), **{key: 2.0 if key == "beta" else True})


@pytest.mark.parametrize(
    "objective",
    [
        vaelib.ELBO(k=2),
        vaelib.IWAE(k=3, estimator="dreg"),
        vaelib.BetaELBO(beta=0.5, warmup_epochs=1),
        vaelib.Renyi(0.5, k=3),
    ],
    ids=lambda o: type(o).__name__,
)
def test_each_value_trains_checkpoints_and_resumes_bitwise(objective, tmp_path):
    """Two epochs, then a resume to four, end where four uninterrupted epochs do; History names the objective."""
    data = torch.rand(60, 12)
    options = {"objective": objective, "batch_size": 20, "progress": False, "device": "cpu", "valid_x": data[:20]}

    def trained(**extra):
        torch.manual_seed(0)
        vae = vaelib.VAE.mlp(12, 3, (16,))
        history = vaelib.fit(vae, data, **options, **extra)
        return vae, history

    whole, history = trained(epochs=4)
    trained(epochs=2, checkpoint=tmp_path / "c.pt")
    resumed, _ = trained(epochs=4, checkpoint=tmp_path / "c.pt", if_exists="resume")
    assert history.objective == label(objective) and history.k == samples_per_point(objective)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_resume_with_another_objective_or_other_settings_is_refused_naming_both(tmp_path):
    data = torch.rand(40, 12)
    path = tmp_path / "c.pt"
    vaelib.fit(
        vaelib.VAE.mlp(12, 3, (16,)), data, objective=vaelib.Renyi(0.5), epochs=1, checkpoint=path, progress=False
    )
    for other, shown in [
        (vaelib.Renyi(0.9, k=50), r"Renyi\(alpha=0.5, k=5\) then, Renyi\(alpha=0.9, k=50\) now"),
        (vaelib.IWAE(k=5), r"Renyi\(alpha=0.5, k=5\) then, IWAE\(k=5, estimator='reparam'\) now"),
    ]:
        with pytest.raises(CheckpointError, match=shown):
            vaelib.fit(
                vaelib.VAE.mlp(12, 3, (16,)), data, objective=other, epochs=2, checkpoint=path, if_exists="resume"
            )


def test_a_function_objective_resumes_by_its_name_only(tmp_path):
    """What the docs say: a function is recorded by its qualified name, so another function is refused."""
    data, path = torch.rand(40, 12), tmp_path / "c.pt"

    def mine(vae, x):
        return vae.elbo(x)

    def other(vae, x):
        return vae.iwae(x, k=2)

    vaelib.fit(vaelib.VAE.mlp(12, 3, (16,)), data, objective=mine, epochs=1, checkpoint=path, progress=False)
    with pytest.raises(CheckpointError, match=r"the function .*mine then, the function .*other now"):
        vaelib.fit(vaelib.VAE.mlp(12, 3, (16,)), data, objective=other, epochs=2, checkpoint=path, if_exists="resume")
    h = vaelib.fit(
        vaelib.VAE.mlp(12, 3, (16,)),
        data,
        objective=mine,
        epochs=2,
        checkpoint=path,
        if_exists="resume",
        progress=False,
    )
    assert len(h) == 2


EARLIER = [
    ({"objective": "elbo", "k": 1, "analytic_kl": False}, vaelib.ELBO()),
    ({"objective": "elbo", "k": 3, "analytic_kl": True}, vaelib.ELBO(k=3, analytic_kl=True)),
    ({"objective": "iwae", "k": 5, "analytic_kl": False}, vaelib.IWAE(k=5)),
    ({"objective": "iwae", "k": 5, "analytic_kl": False, "estimator": "dreg"}, vaelib.IWAE(k=5, estimator="dreg")),
    (
        {"objective": "elbo", "k": 1, "analytic_kl": False, "beta": 4.0, "free_bits": 0.5},
        vaelib.BetaELBO(4.0, free_bits=0.5),
    ),
    ({"objective": "elbo", "k": 1, "analytic_kl": False, "kl_warmup_epochs": 3}, vaelib.BetaELBO(warmup_epochs=3)),
]


@pytest.mark.parametrize(("saved", "objective"), EARLIER, ids=lambda v: str(v)[:40])
def test_checkpoints_of_the_earlier_version_resume_with_the_same_objective_value(saved, objective, tmp_path):
    """Settings recorded as {"objective": "iwae", "k": 5, ...} resume with vaelib.IWAE(k=5), and only with it."""
    common = {"batch_size": 20, "lr": 1e-3, "seed": 0}
    assert upgrade_settings(saved | common) == run_settings(objective, 20, 1e-3, 0)
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(12, 3, (16,))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    history = History(objective=str(saved["objective"]), k=int(saved["k"]))
    path = tmp_path / "earlier.pt"
    write_training_checkpoint(path, vae, opt, history, saved | common, None)
    data = torch.rand(40, 12)
    h = vaelib.fit(
        vae, data, objective=objective, epochs=1, batch_size=20, checkpoint=path, if_exists="resume", progress=False
    )
    assert len(h) == 1
    with pytest.raises(CheckpointError, match="other training settings: objective"):
        vaelib.fit(vae, data, objective=vaelib.Renyi(0.3), epochs=2, batch_size=20, checkpoint=path, if_exists="resume")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], vaelib.ELBO()),
        (["--objective", "iwae", "--k", "7", "--estimator", "stl"], vaelib.IWAE(k=7, estimator="stl")),
        (["--objective", "beta-elbo", "--beta", "2", "--warmup-epochs", "3"], vaelib.BetaELBO(2.0, warmup_epochs=3)),
        (["--objective", "renyi", "--alpha", "0.5"], vaelib.Renyi(0.5)),
        (["--analytic-kl"], vaelib.ELBO(analytic_kl=True)),
    ],
)
def test_the_cli_builds_the_same_objective_values(argv, expected):
    args = build_parser().parse_args(["train", "--out", "x", *argv])
    assert objective_from_args(args) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--objective", "iwae", "--analytic-kl"], r"--analytic-kl: applies to --objective elbo only, not iwae"),
        (["--beta", "2"], r"--beta: applies to --objective beta-elbo only, not elbo"),
        (["--objective", "renyi"], r"--alpha: --objective renyi needs its alpha"),
        (["--objective", "renyi", "--alpha", "1.5"], r"--alpha: expected a float in \[0, 1\)"),
    ],
)
def test_the_cli_refuses_flags_of_another_objective(argv, message):
    args = build_parser().parse_args(["train", "--out", "x", *argv])
    with pytest.raises(ValueError, match=message):
        objective_from_args(args)


def test_training_precision_sets_what_fit_trains_at():
    """fit trains at "medium" unless called inside vaelib.training_precision; the caller's setting is kept."""
    from vaelib._runtime.devices import fit_precision

    before = torch.get_float32_matmul_precision()
    assert fit_precision() == "medium"
    with vaelib.training_precision("highest"):
        assert fit_precision() == "highest"
    assert fit_precision() == "medium" and torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="precision"):
        with vaelib.training_precision("fast"):
            pass
