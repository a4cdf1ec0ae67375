"""Building layers: smooth activations, and convs/linears whose applied weight (equalised
learning rate and/or spectral norm) is computed in :meth:`_Normalised.effective_weight`.

Keeping the normalisation in one method (instead of a hook that runs on every forward) is
what lets the sampler compute the weights once per chain (:mod:`cfebm.frozen`).

Two parametrisations (docs/method.md, "Network"):

* equalised learning rate (Karras et al. 2018): weights stored ~N(0, 1), scaled by
  sqrt(2 / fan_in) when applied;
* spectral norm (Miyato et al. 2018) exactly as ``torch.nn.utils.spectral_norm``: the
  weight viewed as [out, fan_in] is divided by sigma = u^T W v, where one power iteration
  per training forward updates the buffers u and v (evaluation mode uses them as they are).
  ``init="torch"`` initialises weight and bias as ``nn.Conv2d`` / ``nn.Linear`` do, which is
  how the authors' release initialises its spectrally normalised convolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ACTIVATIONS

_EPS = 1e-12  # torch.nn.utils.spectral_norm's default


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
    """Weight of shape [out, ...] with optional equalised-lr scaling and spectral norm."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        equalized: bool,
        spectral: bool,
        init: str = "normal",
    ):
        super().__init__()
        fan_in = math.prod(weight_shape[1:])
        self.scale = math.sqrt(2.0 / fan_in) if equalized else 1.0
        self.spectral = spectral
        if init == "torch":  # nn.Conv2d / nn.Linear reset_parameters()
            w = torch.empty(weight_shape)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(fan_in)
            b = torch.empty(weight_shape[0]).uniform_(-bound, bound)
        elif init == "normal":
            w = torch.randn(weight_shape) * (1.0 if equalized else math.sqrt(2.0 / fan_in))
            b = torch.zeros(weight_shape[0])
        else:
            raise ValueError(f"unknown init {init!r}")
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b) if bias else None
        if spectral:
            self.register_buffer("u", F.normalize(torch.randn(weight_shape[0]), dim=0, eps=_EPS))
            self.register_buffer("v", F.normalize(torch.randn(fan_in), dim=0, eps=_EPS))

    def effective_weight(self, update: bool | None = None) -> torch.Tensor:
        """The applied weight; ``update`` runs a power iteration (default: in training)."""
        w = self.weight * self.scale if self.scale != 1.0 else self.weight
        if not self.spectral:
            return w
        if update is None:
            update = self.training
        w_mat = w.flatten(1)  # [out, fan_in]
        u, v = self.u, self.v
        if update:
            with torch.no_grad():
                v = F.normalize(w_mat.t() @ u, dim=0, eps=_EPS, out=v)
                u = F.normalize(w_mat @ v, dim=0, eps=_EPS, out=u)
        u, v = u.clone(), v.clone()
        sigma = torch.dot(u, w_mat @ v)
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
        init: str = "normal",
    ):
        super().__init__((out_ch, in_ch, kernel, kernel), bias, equalized, spectral, init)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.padding)


class EqLinear(_Normalised):
    def __init__(
        self,
        in_f: int,
        out_f: int,
        equalized: bool = True,
        spectral: bool = False,
        init: str = "normal",
    ):
        super().__init__((out_f, in_f), True, equalized, spectral, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)
