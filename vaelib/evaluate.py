"""Evaluating a latent variable model: importance-sampled log-likelihood with diagnostics, active units.

Any model with an amortized posterior works (:class:`~vaelib.protocols.AmortizedModel`): a
:class:`~vaelib.models.VAE`, or a model of your own written with
``torch.distributions``, such as a probabilistic PCA.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
from numpy import ndarray
from torch import Tensor

from vaelib._checks import LIKELIHOODS, check_data, check_nonnegative_int, check_positive_float, check_positive_int
from vaelib._runtime.progress import progress_bar, progress_enabled
from vaelib._runtime.threads import compute_threads
from vaelib.data import bernoulli_draw
from vaelib.protocols import AmortizedModel

__all__ = ["LogLikelihood", "active_units", "latent_activity", "log_likelihood", "pareto_khat"]

# Importance samples (k times data points) held in memory at once.
_SAMPLES_PER_PASS = {"cuda": 2**20}
_SAMPLES_PER_PASS_DEFAULT = 2**16


@dataclass(frozen=True)
class LogLikelihood:
    """An importance-sampled :math:`\\log p(x)` per data point, with its diagnostics.

    Attributes
    ----------
    log_px : Tensor, shape (batch,)
        The estimate :math:`\\log \\frac{1}{k}\\sum_i w_i`.
    se : Tensor, shape (batch,)
        Its standard error by the delta method,
        :math:`\\sqrt{1/\\mathrm{ESS} - 1/k}`, computed from the same weights.
        It can look small while the estimate is far off: check ``khat``.
    ess : Tensor, shape (batch,)
        Kish's effective sample size :math:`(\\sum_i w_i)^2 / \\sum_i w_i^2`.
    khat : Tensor, shape (batch,), or None
        Pareto :math:`\\hat k` of the weights' upper tail (ArviZ's PSIS);
        above :attr:`khat_threshold` the estimate is unreliable (Vehtari et al. 2024).
    k : int
        Importance samples per data point.
    """

    log_px: Tensor
    se: Tensor
    ess: Tensor
    khat: Tensor | None
    k: int

    @property
    def khat_threshold(self) -> float:
        """:math:`\\min(1 - 1/\\log_{10} k, 0.7)`, the sample-size-dependent limit of Vehtari et al. (2024)."""
        return max(0.0, min(1 - 1 / math.log10(self.k), 0.7)) if self.k > 1 else 0.0


def pareto_khat(log_w: Tensor | ndarray) -> Tensor:
    """Pareto :math:`\\hat k` of importance weights, by ArviZ's ``psislw`` (PSIS).

    Parameters
    ----------
    log_w : Tensor or ndarray, shape (k, batch)
        Log importance weights, particles first (at least 25 of them).

    Returns
    -------
    Tensor, shape (batch,), float64
        NaN where all the weights of a point are equal (no tail to fit).

    Raises
    ------
    ImportError
        If ArviZ (0.x, ``pip install arviz``) is not installed.

    References
    ----------
    Vehtari, Simpson, Gelman, Yao and Gabry (2024), "Pareto Smoothed Importance Sampling", JMLR 25(72).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.x announces its 1.0 refactor on import
            import arviz
    except ImportError as err:
        raise ImportError("pareto_khat: the Pareto k-hat needs ArviZ; install it with `pip install 'arviz<1'`") from err
    lw = log_w.detach().double().cpu().numpy() if isinstance(log_w, Tensor) else np.asarray(log_w, dtype=np.float64)
    if lw.ndim != 2 or lw.shape[0] < 25:
        raise ValueError(f"log_w: expected shape (k, batch) with k >= 25, got {lw.shape}")
    # ArviZ 0.x takes the log weights themselves (not negated), samples on the last axis.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # equal weights have no tail: k-hat is NaN
        _, khat = arviz.psislw(np.ascontiguousarray(lw.T))  # type: ignore[no-untyped-call]  # (batch,)
    return torch.as_tensor(np.asarray(khat, dtype=np.float64)).reshape(lw.shape[1])


def _model_device_dtype(model: object, x: Tensor) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if p is None:
        return x.device, x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return p.device, p.dtype


def _check_model(model: object) -> None:
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "log_joint", None))):
        raise TypeError(
            f"model: expected a model with encode(x) and log_joint(x, z) (see AmortizedModel), "
            f"got {type(model).__name__}"
        )


def _check_inputs(model: object, x: object) -> Tensor:
    likelihood = getattr(model, "likelihood", None)
    likelihood = likelihood if likelihood in LIKELIHOODS else "gaussian"  # no range check when unknown
    event_shape = getattr(model, "x_shape", None)
    if event_shape is None:
        t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        event_shape = tuple(t.shape[1:]) if t.dim() >= 2 else (t.shape[-1],)
    return check_data(x, "x", event_shape=tuple(event_shape), likelihood=str(likelihood))


@overload
def log_likelihood(
    vae: AmortizedModel,
    x: Tensor | ndarray,
    k: int = ...,
    batch_size: int | None = ...,
    *,
    return_diagnostics: Literal[False] = ...,
    binarize: bool = ...,
    seed: int | None = ...,
    progress: bool | None = ...,
) -> Tensor: ...


@overload
def log_likelihood(
    vae: AmortizedModel,
    x: Tensor | ndarray,
    k: int = ...,
    batch_size: int | None = ...,
    *,
    return_diagnostics: Literal[True],
    binarize: bool = ...,
    seed: int | None = ...,
    progress: bool | None = ...,
) -> LogLikelihood: ...


@torch.no_grad()
def log_likelihood(
    vae: AmortizedModel,
    x: Tensor | ndarray,
    k: int = 5000,
    batch_size: int | None = None,
    *,
    return_diagnostics: bool = False,
    binarize: bool = False,
    seed: int | None = None,
    progress: bool | None = None,
) -> Tensor | LogLikelihood:
    """Importance-sampled estimate of :math:`\\log p_\\theta(x)` with ``k`` samples.

    .. math::

        \\log \\hat p(x) = \\log \\frac{1}{k} \\sum_{i=1}^k
        \\frac{p_\\theta(x, z_i)}{q_\\phi(z_i \\mid x)}, \\qquad z_i \\sim q_\\phi(z \\mid x),

    the IWAE bound with large ``k`` (Burda et al. 2015, section 5.1). It is
    a stochastic lower bound that converges to :math:`\\log p(x)` as ``k`` grows.

    Work is split so memory stays bounded whatever ``k``: ``batch_size``
    data points at a time, and for each batch the ``k`` samples in chunks
    whose running ``logsumexp`` is merged with ``logaddexp``. On a CPU the
    chunks run on one thread or on torch's count, whichever is faster at the
    moment, unless the caller set the count (see :mod:`vaelib._runtime.threads`); the
    caller's count is restored afterwards.

    Parameters
    ----------
    vae : AmortizedModel
        A :class:`~vaelib.models.VAE` or any model with ``encode`` and ``log_joint``.
    x : Tensor or ndarray, shape ``(batch, *x_shape)``
        Data (binary for a true Bernoulli likelihood; a Bernoulli model scoring
        other values warns).
    k : int
        Importance samples per data point.
    batch_size : int, optional
        Data points per pass; by default chosen from the device.
    return_diagnostics : bool
        Return a :class:`LogLikelihood` with the standard error, the effective
        sample size and (ArviZ installed, ``k >= 25``) the Pareto :math:`\\hat k`
        of each estimate. The weights of a batch are then held in memory at once.
    binarize : bool
        Draw the data as Bernoulli(x) once before scoring (for grey images).
    seed : int, optional
        Seed the binarization and the samples; the caller's random state is left untouched.
    progress : bool, optional
        Show a progress bar (by default in terminals and live notebooks).

    Returns
    -------
    Tensor, shape (batch,), or LogLikelihood
        On the device and with the dtype of the model.
    """
    _check_model(vae)
    k = check_positive_int(k, "k")
    x = _check_inputs(vae, x)
    if binarize and getattr(vae, "likelihood", "bernoulli") != "bernoulli":
        raise ValueError("binarize: binarizing the data applies to a Bernoulli likelihood only")
    device, dtype = _model_device_dtype(vae, x)
    budget = _SAMPLES_PER_PASS.get(device.type, _SAMPLES_PER_PASS_DEFAULT)
    if batch_size is None:
        batch_size = max(1, min(x.shape[0], budget // min(k, budget)))
    batch_size = check_positive_int(batch_size, "batch_size")
    chunk = max(1, min(k, budget // batch_size))
    if seed is not None:
        seed = check_nonnegative_int(seed, "seed")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if binarize:
            x = bernoulli_draw(x.to(dtype))
        elif getattr(vae, "likelihood", None) == "bernoulli" and not bool(((x == 0) | (x == 1)).all()):
            warnings.warn(
                "log_likelihood: a Bernoulli model is scoring values other than 0 and 1, which is a "
                "cross-entropy, not a log-likelihood; pass binarize=True or binarized data",
                stacklevel=2,
            )
        return _estimate(vae, x, k, batch_size, chunk, device, dtype, return_diagnostics, progress)


def _estimate(
    vae: AmortizedModel,
    x: Tensor,
    k: int,
    batch_size: int,
    chunk: int,
    device: torch.device,
    dtype: torch.dtype,
    diagnostics: bool,
    progress: bool | None,
) -> Tensor | LogLikelihood:
    was_training = getattr(vae, "training", None)
    if isinstance(vae, torch.nn.Module):
        vae.eval()
    sums, squares, khats = [], [], []
    bar = progress_bar(progress_enabled(progress), total=x.shape[0], desc=f"log p(x), k={k}", unit="x")
    # On a CPU, one thread or torch's count, whichever is faster now (vaelib._runtime.threads).
    try:
        with compute_threads(device, vae, batch_size * chunk) as step:
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device, dtype)  # (b, *x_shape)
                q = vae.encode(xb)
                s1 = torch.full((xb.shape[0],), -math.inf, device=device, dtype=dtype)  # log sum w
                s2 = s1.clone()  # log sum w^2
                kept = []
                for done in range(0, k, chunk):
                    with step():
                        z = q.sample((min(chunk, k - done),))  # (c, b, z_dim)
                        log_w = vae.log_joint(xb, z) - q.log_prob(z)  # (c, b)
                        s1 = torch.logaddexp(s1, torch.logsumexp(log_w, dim=0))
                        if diagnostics:
                            s2 = torch.logaddexp(s2, torch.logsumexp(2 * log_w, dim=0))
                            kept.append(log_w)
                sums.append(s1)
                squares.append(s2)
                if diagnostics and k >= 25 and _has_arviz():
                    khats.append(pareto_khat(torch.cat(kept)))  # (b,)
                if bar is not None:
                    bar.update(xb.shape[0])
    finally:
        if bar is not None:
            bar.close()
        if isinstance(vae, torch.nn.Module) and was_training is not None:
            vae.train(was_training)
    log_sum = torch.cat(sums)
    log_px = log_sum - math.log(k)
    if not diagnostics:
        return log_px
    ess = torch.exp(2 * log_sum - torch.cat(squares))  # (sum w)^2 / sum w^2
    se = torch.sqrt(torch.clamp(1 / ess - 1 / k, min=0.0))
    khat = torch.cat(khats) if khats else None
    return LogLikelihood(log_px=log_px, se=se, ess=ess, khat=khat, k=k)


def _has_arviz() -> bool:
    import importlib.util

    if importlib.util.find_spec("arviz") is None:
        warnings.warn(
            "log_likelihood: no Pareto k-hat without ArviZ (`pip install 'arviz<1'`); khat is None",
            stacklevel=4,
        )
        return False
    return True


@torch.no_grad()
def latent_activity(vae: AmortizedModel, x: Tensor | ndarray, batch_size: int = 1000) -> Tensor:
    """Variance across the data of each latent's posterior mean, :math:`\\operatorname{Var}_x \\mathbb{E}_q[z_j]`.

    Parameters
    ----------
    vae : AmortizedModel
        A :class:`~vaelib.models.VAE` or any model whose ``encode(x)`` has a ``mean``.
    x : Tensor or ndarray, shape ``(n, *x_shape)``

    Returns
    -------
    Tensor, shape (z_dim,)

    References
    ----------
    Burda et al. (2015), section 5.2.
    """
    _check_model(vae)
    x = _check_inputs(vae, x)
    device, dtype = _model_device_dtype(vae, x)
    with compute_threads(device, vae, min(batch_size, x.shape[0]), once=True):
        means = torch.cat(
            [vae.encode(x[i : i + batch_size].to(device, dtype)).mean for i in range(0, x.shape[0], batch_size)]
        )  # (n, z_dim)
    return means.var(dim=0, unbiased=False)


def active_units(vae: AmortizedModel, x: Tensor | ndarray, threshold: float = 1e-2) -> int:
    """Number of latent dimensions whose activity exceeds ``threshold`` (Burda et al. use 0.01)."""
    threshold = check_positive_float(threshold, "threshold")
    return int((latent_activity(vae, x) > threshold).sum())
