"""The networks of the ready-made VAEs: their architectures, enough to rebuild a model from a file, and their builders.

:class:`MLPConfig` describes a fully connected encoder and decoder, :class:`ConvConfig`
a convolutional one; :meth:`vaelib.models.VAE.mlp` and :meth:`vaelib.models.VAE.conv` build the
networks with :func:`mlp_network` and :func:`conv_networks` and keep the config.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn

from vaelib._checks import LIKELIHOODS, check_choice, check_positive_int

__all__ = ["ACTIVATIONS", "ConvConfig", "MLPConfig", "conv_networks", "mlp_network"]

Activation = Literal["tanh", "relu"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass(frozen=True)
class MLPConfig:
    """Architecture of a fully connected VAE; enough to rebuild it from a file."""

    x_dim: int
    z_dim: int
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    likelihood: str = "bernoulli"

    def __post_init__(self) -> None:
        check_positive_int(self.x_dim, "x_dim")
        check_positive_int(self.z_dim, "z_dim")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for h in self.hidden:
            check_positive_int(h, "hidden")
        check_choice(self.activation, "activation", tuple(ACTIVATIONS))
        check_choice(self.likelihood, "likelihood", LIKELIHOODS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass(frozen=True)
class ConvConfig:
    """Architecture of a convolutional VAE; enough to rebuild it from a file."""

    x_shape: tuple[int, int, int]
    z_dim: int
    channels: tuple[int, ...] = (32, 64)
    likelihood: str = "bernoulli"

    def __post_init__(self) -> None:
        object.__setattr__(self, "x_shape", tuple(self.x_shape))
        object.__setattr__(self, "channels", tuple(self.channels))
        if len(self.x_shape) != 3:
            raise ValueError(f"x_shape: expected (channels, height, width), got {self.x_shape}")
        for d in self.x_shape:
            check_positive_int(d, "x_shape")
        check_positive_int(self.z_dim, "z_dim")
        if not self.channels:
            raise ValueError("channels: expected at least one convolutional layer")
        for c in self.channels:
            check_positive_int(c, "channels")
        factor = 2 ** len(self.channels)
        if self.x_shape[1] % factor or self.x_shape[2] % factor:
            raise ValueError(
                f"x_shape: height and width must be divisible by {factor} (one halving per layer of "
                f"channels={self.channels}), got {self.x_shape[1:]}"
            )
        check_choice(self.likelihood, "likelihood", LIKELIHOODS)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "conv", **asdict(self), "x_shape": list(self.x_shape), "channels": list(self.channels)}


def mlp_network(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes, ``activation`` between them and none after the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def conv_networks(config: ConvConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """Stride-2 convolutions down, a linear layer to the latent, and the mirror image up."""
    c, h, w = config.x_shape
    channels = [c, *config.channels]
    down: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        down += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
    factor = 2 ** len(config.channels)
    inner = (channels[-1], h // factor, w // factor)  # the smallest feature map
    encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(math.prod(inner), 2 * config.z_dim))
    out = c if config.likelihood == "bernoulli" else 2 * c
    up: list[nn.Module] = [nn.Linear(config.z_dim, math.prod(inner)), nn.ReLU(), nn.Unflatten(1, inner)]
    rev = list(reversed(channels))
    for i, (c_in, c_out) in enumerate(itertools.pairwise(rev)):
        last = i == len(rev) - 2
        up.append(nn.ConvTranspose2d(c_in, out if last else c_out, kernel_size=4, stride=2, padding=1))
        if not last:
            up.append(nn.ReLU())
    return encoder, nn.Sequential(*up)
