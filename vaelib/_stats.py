"""The mean of per-data-point values and its standard error, as vaelib reports them."""

from __future__ import annotations

import math

from torch import Tensor


def mean_se(values: Tensor) -> tuple[float, float]:
    """Mean of ``values`` (shape ``(n,)``) and its standard error :math:`s / \\sqrt{n}`; NaN error for one value."""
    n = values.numel()
    values = values.detach()
    se = float(values.std()) / math.sqrt(n) if n > 1 else math.nan
    return float(values.mean()), se
