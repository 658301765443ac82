"""Pictures the chapters draw: image grids of data, samples and reconstructions."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vaelib.models import VAE

__all__ = ["image_grid", "samples_and_reconstructions", "show_images"]


def image_grid(images: Tensor, *, ncol: int | None = None, pad: int = 1) -> Tensor:
    """Tile flattened square images ``(n, side * side)`` into one ``(H, W)`` array in [0, 1], padded with 0."""
    images = images.detach().float().cpu()
    n, d = images.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"images: expected square images flattened to side*side pixels, got {d} pixels")
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.zeros(nrow * (side + pad) + pad, ncol * (side + pad) + pad)
    for i, img in enumerate(images.clamp(0, 1).reshape(n, side, side)):
        r, c = divmod(i, ncol)
        top, left = pad + r * (side + pad), pad + c * (side + pad)
        grid[top : top + side, left : left + side] = img
    return grid


def show_images(images: Tensor, *, ax: Axes | None = None, title: str | None = None, ncol: int | None = None) -> Axes:
    """Draw :func:`image_grid` of ``images`` in grey on ``ax``."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image_grid(images, ncol=ncol).numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def samples_and_reconstructions(vae: VAE, x: Tensor, *, n: int = 32) -> Figure:
    """One figure: model samples, data, and their reconstructions side by side."""
    import matplotlib.pyplot as plt

    device = next(vae.parameters()).device
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.24))
    x = x[:n].to(device)
    show_images(vae.sample(n), ax=axes[0], title="samples from the model", ncol=8)
    show_images(x, ax=axes[1], title="data", ncol=8)
    show_images(vae.reconstruct(x), ax=axes[2], title="reconstructions", ncol=8)
    fig.tight_layout()
    return fig
