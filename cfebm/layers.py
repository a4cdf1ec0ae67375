"""Building layers: smooth activations, and convs/linears with equalised learning rate and
spectral normalisation whose effective weight can be read once and reused.

Keeping the normalisation in :meth:`EqConv2d.effective_weight` (instead of a hook that
runs on every forward) is what lets the sampler compute the weights once per chain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ACTIVATIONS


class Swish(nn.Module):
    """x * sigmoid(x) / 1.1, the release's smooth activation (paper Sec. 3.3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) / 1.1


def make_activation(name: str) -> nn.Module:
    if name == "swish":
        return Swish()
    if name == "gelu":
        return nn.GELU()
    if name == "elu":
        return nn.ELU()
    if name == "celu":
        return nn.CELU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2)
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


class _Normalised(nn.Module):
    """Weight of shape [out, ...] with equalised-lr scaling and optional spectral norm.

    Equalised learning rate (Karras et al. 2018): weights are stored ~N(0, 1) and scaled by
    sqrt(2 / fan_in) at run time. Spectral norm (Miyato et al. 2018): the weight, viewed as
    [out, fan_in], is divided by its largest singular value, estimated by one power
    iteration per training forward (the iteration vector ``u`` is a buffer, so it is saved
    with the model and identical after a resume).
    """

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, equalized: bool, spectral: bool):
        super().__init__()
        fan_in = math.prod(weight_shape[1:])
        self.scale = math.sqrt(2.0 / fan_in) if equalized else 1.0
        init_std = 1.0 if equalized else math.sqrt(2.0 / fan_in)
        self.weight = nn.Parameter(torch.randn(weight_shape) * init_std)
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self.spectral = spectral
        if spectral:
            u = torch.randn(weight_shape[0])
            self.register_buffer("u", u / u.norm())

    def effective_weight(self, update: bool | None = None) -> torch.Tensor:
        """The applied weight; ``update`` runs a power iteration (default: in training)."""
        w = self.weight * self.scale
        if not self.spectral:
            return w
        if update is None:
            update = self.training
        w_mat = w.flatten(1)  # [out, fan_in]
        if update:
            with torch.no_grad():
                v = F.normalize(w_mat.t() @ self.u, dim=0, eps=1e-12)
                self.u.copy_(F.normalize(w_mat @ v, dim=0, eps=1e-12))
        with torch.no_grad():
            v = F.normalize(w_mat.t() @ self.u, dim=0, eps=1e-12)
        sigma = self.u @ (w_mat @ v)
        return w / sigma


class EqConv2d(_Normalised):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        padding: int = 0,
        bias: bool = True,
        equalized: bool = True,
        spectral: bool = False,
    ):
        super().__init__((out_ch, in_ch, kernel, kernel), bias, equalized, spectral)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.padding)


class EqLinear(_Normalised):
    def __init__(self, in_f: int, out_f: int, equalized: bool = True, spectral: bool = False):
        super().__init__((out_f, in_f), True, equalized, spectral)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)
