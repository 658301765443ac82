"""The training engine behind :func:`vaelib.training.fit.fit`: callbacks, the per-epoch history, where batches come
from, checkpoints, several processes under ``torchrun`` and the run folder of the command line.

The math it trains lives at the top of the package; this folder holds the machinery.
"""

from vaelib.training import batches, callbacks, checkpoint, distributed, history, model_file, run_folder

__all__ = ["batches", "callbacks", "checkpoint", "distributed", "history", "model_file", "run_folder"]
