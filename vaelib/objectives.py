"""What :func:`~vaelib.training.fit.fit` maximizes, as values: ELBO, IWAE, BetaELBO and Renyi.

An objective is anything called as ``objective(model, x)`` that returns a
differentiable bound per data point, shape ``(batch,)`` (the :class:`Objective`
protocol). The four classes here are small frozen dataclasses that follow it and
answer three more questions:

* ``settings()``: what a checkpoint records, and what a resumed run must repeat
  (its class name and every field);
* ``for_epoch(epoch)``: the objective of epoch ``epoch`` (from 1), for schedules such
  as KL warm-up; the others return themselves;
* ``for_validation()``: the bound to score held-out data with (the ELBO for
  :class:`BetaELBO`, whose training value weights the KL).

Their fields are checked where they are written: ``IWAE(k=0)`` fails at once, not in
the first epoch. A plain function ``(model, x) -> (batch,)`` is an objective too; a
checkpoint can record only its qualified name, so a resume cannot tell two functions
of the same name (two lambdas, or one closure over other constants) apart.

References
----------
Kingma and Welling (2013), "Auto-Encoding Variational Bayes"; Burda, Grosse and
Salakhutdinov (2015), "Importance Weighted Autoencoders"; Higgins et al. (2017),
"beta-VAE"; Li and Turner (2016), "Renyi Divergence Variational Inference".
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from torch import Tensor

from vaelib._checks import check_bool, check_choice, check_nonnegative_int, check_positive_int
from vaelib.iwae_gradients import IWAE_ESTIMATORS, iwae_surrogate
from vaelib.rate_distortion import beta_elbo, check_weight, kl_warmup
from vaelib.renyi import check_alpha, renyi_from_log_weights

__all__ = [
    "ELBO",
    "IWAE",
    "BetaELBO",
    "IWAEEstimator",
    "Objective",
    "Renyi",
    "describe",
    "epoch_objective",
    "label",
    "qualified_name",
    "resolve",
    "samples_per_point",
    "settings_of",
    "upgrade_settings",
    "validation_objective",
]

IWAEEstimator = Literal["reparam", "stl", "dreg"]


class Objective(Protocol):
    """A training objective: ``objective(model, x)`` is a differentiable bound per data point.

    ``x`` has shape ``(batch, *event_shape)`` (binarized already when ``fit``
    binarizes); the result has shape ``(batch,)``, and ``fit`` maximizes its mean.
    It draws its samples from the global torch generator, which ``fit`` seeds.
    Example: ``lambda vae, x: vae.iwae(x, k=10) - 0.1 * vae.elbo(x)``.
    """

    def __call__(self, model: Any, x: Tensor, /) -> Tensor: ...


def qualified_name(fn: object) -> str:
    """The name a checkpoint records for a function or callable object."""
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


@dataclass(frozen=True)
class _Value:
    """What the objective values share: their settings, and no schedule by default."""

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records and a resume compares: the class name and every field."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"name": type(self).__name__, **fields}

    def for_epoch(self, epoch: int) -> Objective:
        """The objective of epoch ``epoch`` (from 1): this one, for an objective without a schedule."""
        return self  # type: ignore[return-value]

    def for_validation(self) -> Objective:
        """The bound held-out data are scored with: this one."""
        return self  # type: ignore[return-value]


@dataclass(frozen=True)
class ELBO(_Value):
    """The evidence lower bound, averaged over ``k`` samples per data point.

    .. math::

        \\hat{\\mathcal{L}}(x) = \\frac{1}{k}\\sum_{i=1}^k \\log \\frac{p_\\theta(x, z_i)}{q_\\phi(z_i \\mid x)},
        \\qquad z_i \\sim q_\\phi(z \\mid x),

    or, with ``analytic_kl``, the sampled reconstruction term minus the closed-form
    :math:`\\mathrm{KL}(q_\\phi(z \\mid x) \\,\\Vert\\, p(z))` (Kingma and Welling 2013, eq. (10)).
    Calls ``model.elbo(x, k=k, analytic_kl=analytic_kl)``; the gradient is the
    reparameterization gradient.
    """

    k: int = 1
    analytic_kl: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.k, "k")
        check_bool(self.analytic_kl, "analytic_kl")

    def __call__(self, model: Any, x: Tensor, /) -> Tensor:
        out: Tensor = model.elbo(x, k=self.k, analytic_kl=self.analytic_kl)
        return out


@dataclass(frozen=True)
class IWAE(_Value):
    """The importance weighted bound with ``k`` samples, and the estimator of its gradient.

    .. math::

        \\hat{\\mathcal{L}}_k(x) = \\log \\frac{1}{k}\\sum_{i=1}^k w_i, \\qquad
        w_i = \\frac{p_\\theta(x, z_i)}{q_\\phi(z_i \\mid x)}.

    ``estimator`` chooses the encoder's gradient (the value is the bound in every case;
    see :func:`vaelib.iwae_gradients.iwae_surrogate`): ``"reparam"``, the reparameterization
    gradient (Burda et al. 2015); ``"stl"``, sticking the landing (Roeder et al. 2017; biased
    for ``k > 1``); ``"dreg"``, doubly reparameterized (Tucker et al. 2018). With ``k = 1``
    the bound is the ELBO (and a warning says so).
    """

    k: int = 5
    estimator: IWAEEstimator = "reparam"

    def __post_init__(self) -> None:
        check_positive_int(self.k, "k")
        check_choice(self.estimator, "estimator", IWAE_ESTIMATORS)
        if self.k == 1:
            warnings.warn("IWAE(k=1) is the ELBO; use k > 1 for a tighter bound", stacklevel=3)

    def __call__(self, model: Any, x: Tensor, /) -> Tensor:
        if self.estimator == "reparam":
            out: Tensor = model.iwae(x, k=self.k)
            return out
        return iwae_surrogate(x, model.encode(x), model, self.k, estimator=self.estimator)


@dataclass(frozen=True)
class BetaELBO(_Value):
    """The beta objective :math:`-(D + \\beta R)`, with KL warm-up and free bits.

    .. math::

        \\mathcal{L}^{\\beta}(x) = \\mathbb{E}_{q_\\phi(z \\mid x)}\\big[\\log p_\\theta(x \\mid z)\\big]
        - \\beta_e\\, \\mathrm{KL}\\big(q_\\phi(z \\mid x) \\,\\Vert\\, p(z)\\big),

    where the weight :math:`\\beta_e` of epoch :math:`e` is ``beta``, or rises linearly from
    0 to ``beta`` over the first ``warmup_epochs`` epochs (:func:`vaelib.rate_distortion.kl_warmup`),
    or is ``schedule(e)``. ``free_bits`` is :math:`\\lambda` in nats per latent dimension
    (Kingma et al. 2016, appendix C; see :func:`vaelib.rate_distortion.beta_elbo`). The KL is in
    closed form where torch has one. With the defaults it is the ELBO. Held-out data are
    scored with the ELBO (:meth:`for_validation`), not with the weighted objective.

    References
    ----------
    Higgins et al. (2017), "beta-VAE"; Bowman et al. (2016), section 3.1 (KL warm-up);
    Alemi et al. (2018), "Fixing a Broken ELBO".
    """

    beta: float = 1.0
    warmup_epochs: int = 0
    schedule: Callable[[int], float] | None = None
    free_bits: float = 0.0
    k: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", check_weight(self.beta, "beta"))
        check_nonnegative_int(self.warmup_epochs, "warmup_epochs")
        object.__setattr__(self, "free_bits", check_weight(self.free_bits, "free_bits"))
        check_positive_int(self.k, "k")
        if self.schedule is not None:
            if not callable(self.schedule):
                raise TypeError(f"schedule: expected a function epoch -> weight, got {type(self.schedule).__name__}")
            if self.beta != 1.0 or self.warmup_epochs:
                raise ValueError(
                    "schedule: gives the KL weight of every epoch itself; leave beta and warmup_epochs unset"
                )

    def settings(self) -> dict[str, Any]:
        """The fields, with ``schedule`` recorded by its qualified name (a function cannot be compared)."""
        out = super().settings()
        out["schedule"] = None if self.schedule is None else qualified_name(self.schedule)
        return out

    def weight(self, epoch: int) -> float:
        """The KL weight :math:`\\beta_e` of epoch ``epoch`` (from 1)."""
        if self.schedule is not None:
            return check_weight(self.schedule(epoch), f"schedule (its value at epoch {epoch})")
        return kl_warmup(self.warmup_epochs, self.beta)(epoch)

    def __call__(self, model: Any, x: Tensor, /) -> Tensor:
        return beta_elbo(model, x, self.beta, k=self.k, free_bits=self.free_bits)

    def for_epoch(self, epoch: int) -> Objective:
        """This objective with the constant weight of epoch ``epoch``."""
        if self.schedule is None and not self.warmup_epochs:
            return self
        return BetaELBO(beta=self.weight(epoch), free_bits=self.free_bits, k=self.k)

    def for_validation(self) -> Objective:
        """The ELBO with the same number of samples."""
        return ELBO(k=self.k)


@dataclass(frozen=True)
class Renyi(_Value):
    """The Renyi bound :math:`\\mathcal{L}^{(\\alpha)}_k` with ``k`` samples, reparameterized.

    .. math::

        \\hat{\\mathcal{L}}_{\\alpha}(x) = \\frac{1}{1 - \\alpha}
        \\log \\frac{1}{k} \\sum_{i=1}^k w_i^{1 - \\alpha}

    (see :func:`vaelib.renyi.renyi_from_log_weights`): the ELBO at :math:`\\alpha \\to 1`,
    the IWAE bound at :math:`\\alpha = 0`.

    References
    ----------
    Li and Turner (2016), "Renyi Divergence Variational Inference", eq. (8).
    """

    alpha: float
    k: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        check_positive_int(self.k, "k")

    def __call__(self, model: Any, x: Tensor, /) -> Tensor:
        return renyi_from_log_weights(model.log_weights(x, self.k), self.alpha)


_SHORTHANDS: dict[str, Callable[[], Objective]] = {"elbo": ELBO, "iwae": IWAE}


def resolve(objective: object, name: str = "objective") -> Objective:
    """The objective a ``fit`` argument names: ``"elbo"`` is ``ELBO()``, ``"iwae"`` is ``IWAE()``.

    An objective value or a plain function is returned as it is.
    """
    if isinstance(objective, str):
        check_choice(objective, name, tuple(_SHORTHANDS))
        return _SHORTHANDS[objective]()
    if not callable(objective):
        raise TypeError(
            f"{name}: expected 'elbo', 'iwae', an objective such as vaelib.IWAE(k=5), "
            f"or a function (model, x) -> (batch,); got {type(objective).__name__}"
        )
    return objective


def settings_of(objective: Objective) -> dict[str, Any]:
    """What a checkpoint records of ``objective``: its ``settings()``, or a function's qualified name."""
    settings = getattr(objective, "settings", None)
    if isinstance(objective, _Value) and callable(settings):
        return dict(settings())
    return {"name": qualified_name(objective), "function": True}


def label(objective: Objective) -> str:
    """A short name for bars and logs: ``"elbo"``, ``"iwae"``, ``"beta-elbo"``, ``"renyi"``, or a function's."""
    names = {ELBO: "elbo", IWAE: "iwae", BetaELBO: "beta-elbo", Renyi: "renyi"}
    return names.get(type(objective), qualified_name(objective))


def samples_per_point(objective: Objective) -> int:
    """Samples each data point draws (``k``), 1 for a function: the work of a step scales with it."""
    k = getattr(objective, "k", 1)
    return k if isinstance(k, int) and k > 0 else 1


def epoch_objective(objective: Objective, epoch: int) -> Objective:
    """``objective.for_epoch(epoch)`` where it has a schedule, else ``objective``."""
    hook = getattr(objective, "for_epoch", None)
    return hook(epoch) if isinstance(objective, _Value) and callable(hook) else objective


def validation_objective(objective: Objective) -> Objective:
    """``objective.for_validation()`` for an objective value, else ``objective``."""
    return objective.for_validation() if isinstance(objective, _Value) else objective


def describe(settings: object) -> str:
    """An objective's recorded settings as its constructor call: ``IWAE(k=5, estimator='dreg')``."""
    if not isinstance(settings, dict) or "name" not in settings:
        return repr(settings)
    if settings.get("function"):
        return f"the function {settings['name']}"
    fields = ", ".join(f"{key}={value!r}" for key, value in settings.items() if key != "name")
    return f"{settings['name']}({fields})"


# The KL-weighting options of earlier versions, which made fit's ELBO a BetaELBO.
_EARLIER_BETA = {
    "beta": "beta",
    "kl_warmup_epochs": "warmup_epochs",
    "kl_schedule": "schedule",
    "free_bits": "free_bits",
}


def upgrade_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Settings recorded by an earlier version, with the objective as its value records it now.

    Earlier checkpoints named the objective by a string (``"elbo"``, ``"iwae"`` or a
    function's qualified name) beside ``k``, ``analytic_kl``, ``estimator`` and the KL
    options; they resume when the same objective value is given now.
    """
    name = saved.get("objective")
    if not isinstance(name, str):
        return saved
    out = {key: value for key, value in saved.items() if key not in ("k", "analytic_kl", "estimator", *_EARLIER_BETA)}
    k, estimator = saved.get("k", 1), saved.get("estimator") or "reparam"
    weighted = {new: saved[old] for old, new in _EARLIER_BETA.items() if saved.get(old) is not None}
    if name == "elbo" and weighted:
        beta = {"beta": 1.0, "warmup_epochs": 0, "schedule": None, "free_bits": 0.0, **weighted}
        out["objective"] = {"name": "BetaELBO", **beta, "k": k}
    elif name == "elbo" and estimator == "reparam":
        out["objective"] = {"name": "ELBO", "k": k, "analytic_kl": bool(saved.get("analytic_kl", False))}
    elif name in ("elbo", "iwae"):
        out["objective"] = {"name": "IWAE", "k": k, "estimator": estimator}
    else:
        out["objective"] = {"name": name, "function": True}
    return out
