"""vaelib: the companion package of *Three Roads to the ELBO*.

Bounds on log p(x) from importance weights, an exact linear-Gaussian toy model,
a variational autoencoder built from ``torch.distributions``, a device-resident
training loop, importance-sampled evaluation and data loaders.
"""

from vaelib import (
    anomaly,
    batches,
    callbacks,
    data,
    devices,
    distributed,
    flows,
    gaps,
    objectives,
    plot,
    rate_distortion,
    synthesis,
)
from vaelib.bounds import elbo_from_log_weights, iwae_from_log_weights, log_weights
from vaelib.callbacks import EarlyStopping
from vaelib.checkpoint import CheckpointError, load, save
from vaelib.devices import default_device, training_precision
from vaelib.estimators import elbo_surrogate
from vaelib.evaluate import active_units, latent_activity, log_likelihood
from vaelib.glue import glue
from vaelib.history import History
from vaelib.iwae_gradients import iwae_surrogate
from vaelib.models import VAE, MLPConfig
from vaelib.objectives import ELBO, IWAE, BetaELBO, Renyi
from vaelib.renyi import renyi_from_log_weights
from vaelib.toy import Bimodal, LinearGaussian, as_multivariate_normal
from vaelib.train import TrainingDiverged, fit

__version__ = "0.1.0"

__all__ = [
    "ELBO",
    "IWAE",
    "VAE",
    "BetaELBO",
    "Bimodal",
    "CheckpointError",
    "EarlyStopping",
    "History",
    "LinearGaussian",
    "MLPConfig",
    "Renyi",
    "TrainingDiverged",
    "__version__",
    "active_units",
    "anomaly",
    "as_multivariate_normal",
    "batches",
    "callbacks",
    "data",
    "default_device",
    "devices",
    "distributed",
    "elbo_from_log_weights",
    "elbo_surrogate",
    "fit",
    "flows",
    "gaps",
    "glue",
    "iwae_from_log_weights",
    "iwae_surrogate",
    "latent_activity",
    "load",
    "log_likelihood",
    "log_weights",
    "objectives",
    "plot",
    "rate_distortion",
    "renyi_from_log_weights",
    "save",
    "synthesis",
    "training_precision",
]
