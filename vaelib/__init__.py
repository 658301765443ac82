"""vaelib: the companion package of *Three Roads to the ELBO*.

Bounds on log p(x) from importance weights, an exact linear-Gaussian toy model,
a variational autoencoder built from ``torch.distributions``, a device-resident
training loop, importance-sampled evaluation and data loaders.

The math sits at the top, one module per idea (:mod:`vaelib.bounds`,
:mod:`vaelib.toy`, :mod:`vaelib.models`, ...); the training engine is in
:mod:`vaelib.training` and what only the book's chapters use is in
:mod:`vaelib.book`. The names below are the curated shorthand ``vaelib.X``.
"""

from vaelib import (
    anomaly,
    book,
    data,
    flows,
    gaps,
    objectives,
    rate_distortion,
    training,
)
from vaelib._io.atomic import WriteError
from vaelib._io.lock import RunLocked
from vaelib._runtime.devices import default_device, training_precision
from vaelib.bimodal import Bimodal
from vaelib.book.glue import glue
from vaelib.bounds import elbo_from_log_weights, iwae_from_log_weights, log_weights
from vaelib.estimators import elbo_surrogate
from vaelib.evaluate import active_units, latent_activity, log_likelihood
from vaelib.iwae_gradients import iwae_surrogate
from vaelib.models import VAE
from vaelib.networks import MLPConfig
from vaelib.objectives import ELBO, IWAE, BetaELBO, Renyi
from vaelib.renyi import renyi_from_log_weights
from vaelib.toy import LinearGaussian, as_multivariate_normal
from vaelib.training.callbacks import EarlyStopping
from vaelib.training.fit import fit
from vaelib.training.history import History
from vaelib.training.loop import TrainingDiverged
from vaelib.training.model_file import CheckpointError, load, save

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
    "RunLocked",
    "TrainingDiverged",
    "WriteError",
    "__version__",
    "active_units",
    "anomaly",
    "as_multivariate_normal",
    "book",
    "data",
    "default_device",
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
    "rate_distortion",
    "renyi_from_log_weights",
    "save",
    "training",
    "training_precision",
]
