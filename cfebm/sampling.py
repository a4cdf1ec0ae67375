"""Sampling from a trained (or training) model: the coarse-to-fine chain up to a stage."""

from __future__ import annotations

import torch

from .config import SamplerConfig
from .frozen import stage_energies
from .langevin import Callback, sample_coarse_to_fine
from .model import EnergyNet
from .schedules import chain_schedules


def uniform_noise(
    n: int, channels: int, resolution: int, generator: torch.Generator | None, device=None
) -> torch.Tensor:
    """U[-1, 1] images [n, C, r, r]: where every chain starts."""
    u = torch.rand((n, channels, resolution, resolution), generator=generator, device=device)
    return u * 2 - 1


def sample(
    model: EnergyNet,
    n: int,
    cfg: SamplerConfig,
    *,
    stage: int | None = None,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
) -> torch.Tensor:
    """n samples [n, C, r_s, r_s] in [-1, 1] from stage s (default: the model's current).

    Chains start from uniform noise at the coarsest resolution, or from ``x_init`` (e.g.
    source-domain images for translation) at whichever stage resolution it has; they then
    run K steps per stage up to s, the last stage at fade coefficient ``beta``.
    """
    s = model.stage if stage is None else stage
    device = model.head.linear.weight.device
    if x_init is None:
        first = 0
        x = uniform_noise(n, model.cfg.channels, model.resolution(0), generator, device)
    else:
        r = x_init.shape[-1]
        if r not in model.cfg.resolutions[: s + 1]:
            raise ValueError(
                f"x_init resolution {r} is not a stage resolution up to stage {s}: "
                f"{model.cfg.resolutions[: s + 1]}"
            )
        first = model.cfg.resolutions.index(r)
        x = x_init.to(device)
    energies = stage_energies(model, s, beta, dtype, first_stage=first)
    steps, noise = chain_schedules(cfg, len(energies))
    return sample_coarse_to_fine(
        energies,
        x,
        steps,
        noise,
        generator=generator,
        upsample_noise=cfg.upsample_noise,
        clamp=(-1.0, 1.0) if cfg.clamp else None,
        callback=callback,
    )


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 [0, 255] (round to nearest)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
