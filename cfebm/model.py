"""The energy network that expands from coarse to fine (paper Sec. 3.1-3.2).

One :class:`EnergyNet` holds every stage grown so far. The energy of stage t is the
network read at resolution r_t: ``from_image[r_t]`` then the blocks r_t, r_t/2, ..., 8
and the head at 4x4. Growing adds ``from_image`` and a block at the next finer
resolution; all earlier weights are kept (warm start), only the new layers are fresh.

During the fade after growing into stage s the input path is the Expand block::

    Expand(x) = beta * Primal(x) + (1 - beta) * Fade(x)
    Primal(x) = block[r_s](from_image[r_s](x))
    Fade(x)   = from_image[r_{s-1}](avgpool2(x))

whose output feeds the blocks of stage s-1, so with beta = 0,
E_s(x) == E_{s-1}(avgpool2(x)) exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import EqConv2d, EqLinear, make_activation


class Block(nn.Module):
    """Resolution r -> r/2: conv3x3 - act - conv3x3 - avgpool - act, plus a residual
    1x1 conv + avgpool, summed and scaled by 1/sqrt(2).

    The pool sits between the second conv and its activation (as in progressive-growing
    discriminators), which makes conv3x3 + pool one 4x4 stride-2 conv in the sampler.
    """

    def __init__(self, in_ch: int, out_ch: int, cfg: ModelConfig):
        super().__init__()
        kw = dict(equalized=cfg.equalized_lr, spectral=cfg.spectral_norm)
        self.conv1 = EqConv2d(in_ch, in_ch, 3, padding=1, **kw)
        self.conv2 = EqConv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.skip = EqConv2d(in_ch, out_ch, 1, bias=False, **kw)
        self.act = make_activation(cfg.activation)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(h))
        y = self.act(F.avg_pool2d(self.conv2(y), 2))
        s = F.avg_pool2d(self.skip(h), 2)
        return (y + s) / math.sqrt(2.0)


class Head(nn.Module):
    """At 4x4: conv3x3 - act - conv4x4 (valid) - act - flatten - linear to one scalar."""

    def __init__(self, ch: int, cfg: ModelConfig):
        super().__init__()
        kw = dict(equalized=cfg.equalized_lr, spectral=cfg.spectral_norm)
        self.conv1 = EqConv2d(ch, ch, 3, padding=1, **kw)
        self.conv2 = EqConv2d(ch, ch, 4, padding=0, **kw)
        self.linear = EqLinear(ch, 1, **kw)
        self.act = make_activation(cfg.activation)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(h))
        h = self.act(self.conv2(h))  # B, C, 1, 1
        return self.linear(h.flatten(1)).squeeze(1)  # B


def _res_key(r: int) -> str:
    return f"r{r}"


class EnergyNet(nn.Module):
    """E(x) for images in [-1, 1], grown to ``stage`` (0 <= stage < cfg.num_stages)."""

    def __init__(self, cfg: ModelConfig, stage: int = 0):
        super().__init__()
        self.cfg = cfg
        self.from_image = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        # Blocks from the coarsest stage's resolution down to 8 belong to stage 0.
        r = cfg.resolutions[0]
        self.from_image[_res_key(r)] = self._make_from_image(r)
        while r > 4:
            self.blocks[_res_key(r)] = Block(cfg.width(r), cfg.width(r // 2), cfg)
            r //= 2
        self.head = Head(cfg.width(4), cfg)
        self.stage = 0
        for _ in range(stage):
            self.grow()

    def _make_from_image(self, r: int) -> EqConv2d:
        return EqConv2d(
            self.cfg.channels,
            self.cfg.width(r),
            1,
            equalized=self.cfg.equalized_lr,
            spectral=self.cfg.spectral_norm,
        )

    def resolution(self, stage: int | None = None) -> int:
        return self.cfg.resolutions[self.stage if stage is None else stage]

    def grow(self) -> None:
        """Expand to the next finer stage: fresh ``from_image`` and block at r_{s+1}."""
        if self.stage + 1 >= self.cfg.num_stages:
            raise ValueError(
                f"cannot grow past the last stage ({self.cfg.num_stages - 1}); "
                f"resolutions are {self.cfg.resolutions}"
            )
        self.stage += 1
        r = self.resolution()
        device = self.head.linear.weight.device
        self.from_image[_res_key(r)] = self._make_from_image(r).to(device)
        self.blocks[_res_key(r)] = Block(self.cfg.width(r), self.cfg.width(r // 2), self.cfg).to(
            device
        )

    def trunk(self, h: torch.Tensor, r: int) -> torch.Tensor:
        """Blocks r, r/2, ..., 8 then the head: features at resolution r -> energies [B]."""
        while r > 4:
            h = self.blocks[_res_key(r)](h)
            r //= 2
        return self.head(h)

    def forward(self, x: torch.Tensor, stage: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """Energies [B] of images x [B, C, r_t, r_t] under stage t (default: current)."""
        t = self.stage if stage is None else stage
        if not 0 <= t <= self.stage:
            raise ValueError(f"stage {t} not grown (model is at stage {self.stage})")
        r = self.resolution(t)
        if x.shape[-1] != r or x.shape[-2] != r:
            raise ValueError(f"stage {t} takes {r}x{r} images, got {tuple(x.shape)}")
        h = self.from_image[_res_key(r)](x)
        if t == 0:
            return self.trunk(h, r)
        primal = self.blocks[_res_key(r)](h)
        if beta >= 1.0:
            return self.trunk(primal, r // 2)
        fade = self.from_image[_res_key(r // 2)](F.avg_pool2d(x, 2))
        return self.trunk(beta * primal + (1.0 - beta) * fade, r // 2)

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> EnergyNet:
        """Rebuild a model at the stage its state dict was saved at."""
        stage = sum(1 for k in state if k.startswith("from_image.") and k.endswith(".weight")) - 1
        model = cls(cfg, stage=stage)
        model.load_state_dict(state)
        return model


def warm_start(previous: EnergyNet) -> EnergyNet:
    """A copy of ``previous`` grown by one stage: shared weights copied exactly, new ones fresh."""
    model = EnergyNet(previous.cfg, stage=previous.stage).to(previous.head.linear.weight.device)
    model.load_state_dict(previous.state_dict())
    model.grow()
    return model
