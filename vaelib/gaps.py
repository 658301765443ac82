"""The inference gap and its two parts: approximation and amortization.

For a trained model the ELBO of the encoder's :math:`q_\\phi(z \\mid x)` falls short
of :math:`\\log p_\\theta(x)` by :math:`\\mathrm{KL}(q_\\phi(z \\mid x) \\,\\Vert\\, p_\\theta(z \\mid x))`.
Let :math:`q^*_x` be the best member of the encoder's family for this one
:math:`x`, found by maximizing the ELBO over a free set of parameters for each
data point. Then the gap splits into two non-negative parts:

.. math::

    \\underbrace{\\log p_\\theta(x) - \\mathcal{L}(q_\\phi)}_{\\text{inference gap}}
    = \\underbrace{\\log p_\\theta(x) - \\mathcal{L}(q^*_x)}_{\\text{approximation gap}}
    + \\underbrace{\\mathcal{L}(q^*_x) - \\mathcal{L}(q_\\phi)}_{\\text{amortization gap}} .

The approximation gap is the price of the family; the amortization gap is the
price of predicting each :math:`q` with one shared encoder instead of fitting it.

The split itself is an identity, so it checks nothing. What needs checking is
each term, by a route of its own: :math:`\\log p_\\theta(x)` by
:func:`log_marginal` with more draws or by :func:`~vaelib.evaluate.log_likelihood`
(the encoder as proposal), and :math:`q^*_x` by a second :func:`optimize_posterior`
from another start and seed.

Reference: Cremer, Li and Duvenaud (2018), "Inference Suboptimality in
Variational Autoencoders", ICML, section 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from vaelib._checks import check_choice, check_nonnegative_int, check_positive_float, check_positive_int
from vaelib._runtime.threads import compute_threads
from vaelib._stats import mean_se
from vaelib.bounds import elbo_from_log_weights, log_weights

__all__ = ["InferenceGaps", "inference_gaps", "log_marginal", "optimize_posterior"]

Family = Literal["gaussian", "flow"]
FAMILIES = ("gaussian", "flow")
Start = Literal["encoder", "prior"]
STARTS = ("encoder", "prior")


def _check_model_and_x(model: object, x: object) -> None:
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "log_joint", None))):
        raise TypeError(f"model: expected a model with encode(x) and log_joint(x, z), got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x: expected a batch of data points, shape (batch, *x_shape), got {tuple(x.shape)}")


def _gaussian_start(q: Distribution, n_draws: int = 256) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation, each (batch, z_dim), of ``q``: exact if it has them, else by ``n_draws`` draws."""
    try:
        return q.mean.detach(), q.stddev.detach()
    except NotImplementedError:
        z = q.sample((n_draws,))  # (n_draws, batch, z_dim)
        return z.mean(0), z.std(0)


def optimize_posterior(
    model: Any,
    x: Tensor,
    *,
    family: Family = "gaussian",
    steps: int = 300,
    k: int = 16,
    lr: float = 0.05,
    seed: int = 0,
    start: Start = "encoder",
) -> Distribution:
    """Fit a separate :math:`q_x` to each data point by maximizing its ELBO, the model held fixed.

    .. math::

        q^*_x = \\arg\\max_{q \\in \\mathcal{Q}} \\; \\mathbb{E}_{q}\\big[\\log p_\\theta(x, z) - \\log q(z)\\big]

    by Adam on the reparameterized ``k``-sample estimate of the ELBO, the learning
    rate annealed to zero on a cosine schedule. Each data point has its own
    parameters, so summing the ELBOs of a batch optimizes every point separately.

    Families:

    ``"gaussian"``
        :math:`\\mathcal{N}(m_x, \\operatorname{diag} s_x^2)` with a free mean and
        log standard deviation per point, started at the encoder's ``q`` (its mean
        and standard deviation; for a non-Gaussian encoder, those of 256 draws),
        or with ``start="prior"`` at :math:`\\mathcal{N}(0, I)`.
    ``"flow"``
        For a :class:`~vaelib.flows.FlowVAE`: the model's own flow with a free
        context :math:`h_x` per point, started at the encoder's output. The flow's
        weights stay as trained, so this family is the set of posteriors the
        trained flow can express by some context, a subset of "any flow of this
        architecture per point". Its optimum bounds the amortization gap of the
        flow encoder from below, not the best a fresh flow could do.

    Parameters
    ----------
    model : VAE or FlowVAE
        The trained model; its parameters are not changed.
    x : Tensor, shape ``(batch, *x_shape)``
        Data points, binary for a Bernoulli likelihood, with the model's dtype and device.
    family : {"gaussian", "flow"}
    steps : int
        Adam steps.
    k : int
        Samples per ELBO estimate in each step.
    lr : float
        Initial learning rate.
    seed : int
        Seeds the draws; the caller's random state is left untouched.
    start : {"encoder", "prior"}
        Where the Gaussian family starts: a second fit from ``"prior"`` with
        another seed is an independent check that the first found the optimum.

    Returns
    -------
    Distribution
        :math:`q^*`, batch shape ``(batch,)``, event shape ``(z_dim,)``, detached from the graph.

    References
    ----------
    Cremer, Li and Duvenaud (2018), "Inference Suboptimality in Variational Autoencoders", section 5.
    """
    _check_model_and_x(model, x)
    check_choice(family, "family", FAMILIES)
    check_positive_int(steps, "steps")
    check_positive_int(k, "k")
    check_positive_float(lr, "lr")
    check_nonnegative_int(seed, "seed")
    check_choice(start, "start", STARTS)
    if family == "flow" and start != "encoder":
        raise ValueError(f"start: the flow family starts at the encoder's context, got {start!r}")
    if family == "flow" and not callable(getattr(model, "posterior", None)):
        raise ValueError(
            f"family: 'flow' needs a model whose posterior(h) builds q from a context (a FlowVAE), "
            f"got {type(model).__name__}"
        )
    was_training = getattr(model, "training", None)
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    requires = [p.requires_grad for p in params]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        if isinstance(model, torch.nn.Module):
            model.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.no_grad():
                if family == "gaussian":
                    loc, scale = _gaussian_start(model.encode(x))  # (batch, z_dim) each
                    if start == "prior":
                        loc, scale = torch.zeros_like(loc), torch.ones_like(scale)
                    free = [loc.clone(), scale.log()]  # mean, log standard deviation
                else:
                    h = model.encoder(x.reshape(-1, *model.x_shape))  # (batch, 2 * z_dim)
                    free = [h.clone()]
            for t in free:
                t.requires_grad_(True)

            def build() -> Distribution:
                if family == "gaussian":
                    return Independent(Normal(free[0], free[1].exp(), validate_args=False), 1, validate_args=False)
                q: Distribution = model.posterior(free[0])
                return q

            optimizer = torch.optim.Adam(free, lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            # On a CPU, one thread or torch's count, whichever is faster now (vaelib._runtime.threads).
            with compute_threads(x.device, model, k * x.shape[0]) as step:
                for _ in range(steps):
                    with step():
                        optimizer.zero_grad()
                        loss = -elbo_from_log_weights(log_weights(x, build(), model.log_joint, k)).sum()
                        loss.backward()
                        optimizer.step()
                        schedule.step()
        for t in free:
            t.requires_grad_(False)
        return build()
    finally:
        for p, r in zip(params, requires, strict=True):
            p.requires_grad_(r)
        if isinstance(model, torch.nn.Module) and was_training is not None:
            model.train(was_training)


def log_marginal(model: Any, x: Tensor, q: Distribution, k: int, *, seed: int = 0, chunk: int = 500) -> Tensor:
    """Importance-sampled :math:`\\log p_\\theta(x)` with a proposal ``q`` of the caller's choice.

    .. math::

        \\log \\hat p_k(x) = \\log \\frac{1}{k} \\sum_{i=1}^{k} \\frac{p_\\theta(x, z_i)}{q(z_i)}, \\qquad z_i \\sim q,

    the IWAE bound :math:`\\mathcal{L}_k`, a stochastic lower bound that rises with
    ``k`` to :math:`\\log p_\\theta(x)` (Burda, Grosse and Salakhutdinov 2016, section 5.1);
    :func:`~vaelib.evaluate.log_likelihood` is the same estimate with the encoder as the proposal.

    Parameters
    ----------
    model : VAE or FlowVAE
        Any model with ``log_joint(x, z)``.
    x : Tensor, shape ``(n, *x_shape)``
    q : Distribution
        The proposal, batch shape ``(n,)``, e.g. :math:`q^*_x` from :func:`optimize_posterior`.
    k : int
        Importance samples per data point.
    seed : int
        Seeds the draws; the caller's random state is left untouched.
    chunk : int
        Draws held in memory at once, per data point.

    Returns
    -------
    Tensor, shape (n,)
    """
    if not isinstance(q, Distribution):
        raise TypeError(f"q: expected a torch Distribution, got {type(q).__name__}")
    check_positive_int(k, "k")
    check_nonnegative_int(seed, "seed")
    check_positive_int(chunk, "chunk")
    total = torch.full(x.shape[:1], -math.inf, dtype=x.dtype, device=x.device)  # log sum of the weights
    with torch.no_grad():
        for i, begin in enumerate(range(0, k, chunk)):
            log_w = log_weights(x, q, model.log_joint, min(chunk, k - begin), seed=seed + 7919 * i)  # (c, n)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
    return total - math.log(k)


@dataclass(frozen=True)
class InferenceGaps:
    """Per-point estimates of :math:`\\log p(x)`, two ELBOs and the gaps between them.

    Attributes
    ----------
    log_px : Tensor, shape (n,)
        :math:`\\log p_\\theta(x)`, importance-sampled with :math:`q^*_x` as the proposal.
    elbo_amortized : Tensor, shape (n,)
        :math:`\\mathcal{L}(q_\\phi)`, the encoder's ELBO.
    elbo_optimized : Tensor, shape (n,)
        :math:`\\mathcal{L}(q^*_x)`, the ELBO of the per-point optimum.
    family : str
        The family of :math:`q^*`.
    """

    log_px: Tensor
    elbo_amortized: Tensor
    elbo_optimized: Tensor
    family: str

    @property
    def approximation_gap(self) -> Tensor:
        """:math:`\\log p_\\theta(x) - \\mathcal{L}(q^*_x)`, shape (n,)."""
        return self.log_px - self.elbo_optimized

    @property
    def amortization_gap(self) -> Tensor:
        """:math:`\\mathcal{L}(q^*_x) - \\mathcal{L}(q_\\phi)`, shape (n,)."""
        return self.elbo_optimized - self.elbo_amortized

    @property
    def inference_gap(self) -> Tensor:
        """:math:`\\log p_\\theta(x) - \\mathcal{L}(q_\\phi)`, the sum of the two gaps, shape (n,)."""
        return self.log_px - self.elbo_amortized

    def table(self) -> dict[str, tuple[float, float]]:
        """Each quantity's mean over the data points and its standard error, in nats."""
        return {
            "log p(x)": mean_se(self.log_px),
            "ELBO, encoder": mean_se(self.elbo_amortized),
            "ELBO, optimized": mean_se(self.elbo_optimized),
            "approximation gap": mean_se(self.approximation_gap),
            "amortization gap": mean_se(self.amortization_gap),
            "inference gap": mean_se(self.inference_gap),
        }


def inference_gaps(
    model: Any,
    x: Tensor,
    *,
    family: Family = "gaussian",
    k: int = 5000,
    k_elbo: int = 1000,
    steps: int = 300,
    k_fit: int = 16,
    lr: float = 0.05,
    seed: int = 0,
    posterior: Distribution | None = None,
) -> InferenceGaps:
    """Split :math:`\\log p_\\theta(x) - \\mathcal{L}(q_\\phi)` into the approximation and amortization gaps.

    .. math::

        \\log p_\\theta(x) - \\mathcal{L}(q_\\phi)
        = \\big[\\log p_\\theta(x) - \\mathcal{L}(q^*_x)\\big] + \\big[\\mathcal{L}(q^*_x) - \\mathcal{L}(q_\\phi)\\big]

    :math:`q^*_x` comes from :func:`optimize_posterior` (or ``posterior``); each ELBO is the mean of
    ``k_elbo`` log weights. :math:`\\log p_\\theta(x)` is the importance-sampled
    estimate (the IWAE bound, as in :func:`~vaelib.evaluate.log_likelihood`) with
    ``k`` draws from :math:`q^*_x` (:func:`log_marginal`); it is a stochastic lower
    bound that rises with ``k``, so the approximation gap it gives is, if anything,
    too small, and the amortization gap's share too large: check it with a larger
    ``k`` or another proposal.

    Parameters
    ----------
    model : VAE or FlowVAE
        The trained model.
    x : Tensor, shape ``(n, *x_shape)``
        Data points (binary for a Bernoulli likelihood).
    family : {"gaussian", "flow"}
        The family of :math:`q^*_x` (see :func:`optimize_posterior`).
    k : int
        Importance samples for :math:`\\log p_\\theta(x)`.
    k_elbo : int
        Samples per ELBO estimate.
    steps, k_fit, lr : int, int, float
        Adam steps, samples per step and initial learning rate of the per-point fit.
    seed : int
        Seeds every draw; the caller's random state is left untouched.
    posterior : Distribution, optional
        :math:`q^*_x` fitted beforehand, batch shape ``(n,)``; then ``steps``,
        ``k_fit`` and ``lr`` are unused.

    Returns
    -------
    InferenceGaps
        Per-point tensors and ``table()`` of means and standard errors.

    References
    ----------
    Cremer, Li and Duvenaud (2018), "Inference Suboptimality in Variational Autoencoders", ICML.
    """
    _check_model_and_x(model, x)
    check_choice(family, "family", FAMILIES)
    check_positive_int(k, "k")
    check_positive_int(k_elbo, "k_elbo")
    check_nonnegative_int(seed, "seed")
    if posterior is not None and not isinstance(posterior, Distribution):
        raise TypeError(f"posterior: expected a torch Distribution or None, got {type(posterior).__name__}")
    if posterior is not None and tuple(posterior.batch_shape) != tuple(x.shape[:1]):
        raise ValueError(f"posterior: expected batch shape {tuple(x.shape[:1])}, got {tuple(posterior.batch_shape)}")
    if posterior is None:
        posterior = optimize_posterior(model, x, family=family, steps=steps, k=k_fit, lr=lr, seed=seed)
    with torch.no_grad():
        q_enc = model.encode(x)
        elbo_enc = elbo_from_log_weights(log_weights(x, q_enc, model.log_joint, k_elbo, seed=seed + 1))
        elbo_opt = elbo_from_log_weights(log_weights(x, posterior, model.log_joint, k_elbo, seed=seed + 2))
    log_px = log_marginal(model, x, posterior, k, seed=seed + 4)
    return InferenceGaps(log_px=log_px, elbo_amortized=elbo_enc, elbo_optimized=elbo_opt, family=family)
