"""The energy networks, one per coarse-to-fine stage (paper Sec. 3.1-3.2).

:class:`EnergyNet` is the energy E_t of one stage t: a ``from_image`` 1x1 conv at r_t,
the blocks r_t, r_t/2, ..., 8 and a head at 4x4. During the fade after an expansion into
stage s its input path is the Expand block::

    Expand(x) = beta * Primal(x) + (1 - beta) * Fade(x)
    Primal(x) = block[r_s](from_image[r_s](x))
    Fade(x)   = from_image[r_{s-1}](avgpool2(x))

whose output feeds the blocks shared with stage s-1, so with beta = 0,
E_s(x) == E_{s-1}(avgpool2(x)) exactly.

:class:`CoarseToFineEBM` holds the energies of every stage trained so far, each its own
network: at a transition the finished network is copied and grown (:func:`warm_start`)
and then frozen, so E_t stays exactly as stage t left it and samples r_t in every later
chain; only the newest network is optimised (the authors' final release does the same).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ModelConfig
from .layers import EqConv2d, EqLinear, make_activation


def _layer_kw(cfg: ModelConfig, kind: str) -> dict:
    """Parametrisation of a layer of ``kind``: "conv" (the 3x3/4x4 convs) or "io" (input,
    skip and output layers)."""
    if cfg.network == "release":
        if kind == "conv":
            return dict(equalized=False, spectral=True, init="torch")
        return dict(equalized=True, spectral=False)
    return dict(equalized=cfg.equalized_lr, spectral=cfg.spectral_norm)


class Block(nn.Module):
    """Resolution r -> r/2: conv3x3 - act - conv3x3 - avgpool - act, plus a residual
    1x1 conv + avgpool, summed and scaled by 1/sqrt(2).

    The pool sits between the second conv and its activation (as in the release), which
    makes conv3x3 + pool one 4x4 stride-2 conv in the sampler. The first conv keeps the
    input width (compact) or maps straight to the output width (release).
    """

    def __init__(self, in_ch: int, out_ch: int, cfg: ModelConfig):
        super().__init__()
        mid = out_ch if cfg.network == "release" else in_ch
        conv, io = _layer_kw(cfg, "conv"), _layer_kw(cfg, "io")
        self.conv1 = EqConv2d(in_ch, mid, 3, padding=1, **conv)
        self.conv2 = EqConv2d(mid, out_ch, 3, padding=1, **conv)
        self.skip = EqConv2d(in_ch, out_ch, 1, bias=cfg.network == "release", **io)
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
        conv = _layer_kw(cfg, "conv")
        self.conv1 = EqConv2d(ch, ch, 3, padding=1, **conv)
        self.conv2 = EqConv2d(ch, ch, 4, padding=0, **conv)
        self.linear = EqLinear(ch, 1, **_layer_kw(cfg, "io"))
        self.act = make_activation(cfg.activation)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(h))
        h = self.act(self.conv2(h))  # B, C, 1, 1
        return self.linear(h.flatten(1)).squeeze(1)  # B


def _res_key(r: int) -> str:
    return f"r{r}"


class EnergyNet(nn.Module):
    """E_t(x) of stage ``stage`` for images x [B, C, r_t, r_t] in [-1, 1]."""

    def __init__(self, cfg: ModelConfig, stage: int = 0):
        super().__init__()
        if cfg.channels is None:
            raise ConfigError("model.channels is not set: fill it from the data first")
        if not 0 <= stage < cfg.num_stages:
            raise ValueError(f"stage {stage} not in 0..{cfg.num_stages - 1} of {cfg.resolutions}")
        self.cfg, self.stage = cfg, stage
        r = cfg.resolutions[stage]
        self.from_image = nn.ModuleDict({_res_key(r): self._make_from_image(r)})
        if stage > 0:  # the fade path reads the coarser stage's input conv
            self.from_image[_res_key(r // 2)] = self._make_from_image(r // 2)
        self.blocks = nn.ModuleDict()
        while r > 4:
            self.blocks[_res_key(r)] = Block(cfg.width(r), cfg.width(r // 2), cfg)
            r //= 2
        self.head = Head(cfg.width(4), cfg)

    def _make_from_image(self, r: int) -> EqConv2d:
        return EqConv2d(self.cfg.channels, self.cfg.width(r), 1, **_layer_kw(self.cfg, "io"))

    @property
    def resolution(self) -> int:
        return self.cfg.resolutions[self.stage]

    def trunk(self, h: torch.Tensor, r: int) -> torch.Tensor:
        """Blocks r, r/2, ..., 8 then the head: features at resolution r -> energies [B]."""
        while r > 4:
            h = self.blocks[_res_key(r)](h)
            r //= 2
        return self.head(h)

    def forward(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Energies [B] of x [B, C, r_t, r_t]; ``beta`` < 1 mixes in the fade path."""
        r = self.resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            raise ValueError(f"stage {self.stage} takes {r}x{r} images, got {tuple(x.shape)}")
        h = self.from_image[_res_key(r)](x)
        if self.stage == 0 or r == 4:
            return self.trunk(h, r)
        primal = self.blocks[_res_key(r)](h)
        if beta >= 1.0:
            return self.trunk(primal, r // 2)
        fade = self.from_image[_res_key(r // 2)](F.avg_pool2d(x, 2))
        return self.trunk(beta * primal + (1.0 - beta) * fade, r // 2)


def warm_start(previous: EnergyNet) -> EnergyNet:
    """The network of the next stage: every layer it shares with ``previous`` (its blocks,
    head and input conv, now the fade path) copied exactly; the new block and input conv at
    the finer resolution fresh."""
    net = EnergyNet(previous.cfg, previous.stage + 1).to(next(previous.parameters()).device)
    shared = {k: v for k, v in previous.state_dict().items() if k in net.state_dict()}
    missing, _ = net.load_state_dict(shared, strict=False)
    r = net.resolution
    new = (f"from_image.{_res_key(r)}.", f"blocks.{_res_key(r)}.")
    assert all(k.startswith(new) for k in missing), missing
    return net


class CoarseToFineEBM(nn.Module):
    """The energies E_0, ..., E_s of a model trained up to stage s, one network each.

    ``nets[t]`` is stage t's own network. Those of finished stages (t < s) are frozen: no
    gradients, always in evaluation mode, never changed; ``current`` (stage s) is the one
    being trained.
    """

    def __init__(self, cfg: ModelConfig, stage: int = 0):
        super().__init__()
        self.cfg = cfg
        self.nets = nn.ModuleList([EnergyNet(cfg, t) for t in range(stage + 1)])
        self._freeze_finished()

    @property
    def stage(self) -> int:
        return len(self.nets) - 1

    @property
    def current(self) -> EnergyNet:
        return self.nets[-1]

    @property
    def device(self) -> torch.device:
        return self.current.head.linear.weight.device

    def resolution(self, stage: int | None = None) -> int:
        return self.cfg.resolutions[self.stage if stage is None else stage]

    def grow(self) -> None:
        """Freeze the current stage's network and add the next stage's (warm-started)."""
        if self.stage + 1 >= self.cfg.num_stages:
            raise ValueError(
                f"cannot grow past the last stage ({self.cfg.num_stages - 1}); "
                f"resolutions are {self.cfg.resolutions}"
            )
        self.nets.append(warm_start(self.current))
        self._freeze_finished()

    def _freeze_finished(self) -> None:
        for net in self.nets[:-1]:
            net.requires_grad_(False)
            net.eval()

    def train(self, mode: bool = True) -> CoarseToFineEBM:
        """Training mode applies to the current stage's network only."""
        self.training = mode
        self.current.train(mode)
        for net in self.nets[:-1]:
            net.eval()
        return self

    def forward(self, x: torch.Tensor, stage: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """Energies [B] of x [B, C, r_t, r_t] under stage t's network (default: current);
        ``beta`` applies to the current stage only (finished stages ended at beta = 1)."""
        t = self.stage if stage is None else stage
        if not 0 <= t <= self.stage:
            raise ValueError(f"stage {t} not trained (model is at stage {self.stage})")
        return self.nets[t](x, beta if t == self.stage else 1.0)

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> CoarseToFineEBM:
        """Rebuild a model from its state dict (its stage is the number of networks)."""
        nets = {k.split(".", 2)[1] for k in state if k.startswith("nets.")}
        model = cls(cfg, stage=len(nets) - 1)
        model.load_state_dict(state)
        return model

    def copy(self) -> CoarseToFineEBM:
        return copy.deepcopy(self)
