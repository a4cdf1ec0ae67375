"""Pictures of a model for people: a grid of samples and chains from coarse to fine."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cfebm.config import SamplerConfig
from cfebm.images import grid_png, make_grid
from cfebm.model import EnergyNet
from cfebm.sampling import sample, to_uint8, uniform_noise


def sample_images(
    model: EnergyNet, sampler: SamplerConfig, n: int, seed: int, beta: float = 1.0
) -> np.ndarray:
    """``n`` uint8 samples [n, C, r, r] of the model's current stage, fixed by ``seed``."""
    device = model.head.linear.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    return to_uint8(sample(model, n, sampler, beta=beta, generator=gen)).cpu().numpy()


def chain_frames(
    model: EnergyNet,
    sampler: SamplerConfig,
    chains: int = 8,
    per_stage: int = 4,
    seed: int = 0,
    beta: float = 1.0,
) -> np.ndarray:
    """Snapshots of ``chains`` coarse-to-fine chains: uint8 [chains, T, C, R, R].

    Frame 0 is the uniform noise the chain starts from; then ``per_stage`` snapshots of
    every stage's Langevin run (the last one is that stage's final state), all upsampled
    (nearest) to the finest resolution R, so one row reads from coarse to fine.
    """
    device = model.head.linear.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = uniform_noise(chains, model.cfg.channels, model.resolution(0), gen, device)
    k_steps = sampler.steps
    keep = {round(k_steps * j / per_stage) - 1 for j in range(1, per_stage)}
    frames = [x0]

    def callback(d: dict) -> None:
        if d["k"] == -1 or d["k"] in keep:
            frames.append(d["x"].detach().clone())

    sample(model, chains, sampler, beta=beta, generator=gen, x_init=x0, callback=callback)
    size = model.resolution()
    up = [F.interpolate(f.float(), size=(size, size), mode="nearest") for f in frames]
    return to_uint8(torch.stack(up, dim=1)).cpu().numpy()  # [chains, T, C, R, R]


def chain_png(frames: np.ndarray, scale: int = 4) -> bytes:
    """PNG of :func:`chain_frames`: one row per chain, time running left to right."""
    chains, t = frames.shape[:2]
    return grid_png(frames.reshape(chains * t, *frames.shape[2:]), nrow=t, scale=scale)


def grid(images: np.ndarray, scale: int = 1) -> np.ndarray:
    """uint8 [H, W, C] grid of uint8 images [N, C, r, r], optionally enlarged (nearest)."""
    g = make_grid(images)
    return g.repeat(scale, 0).repeat(scale, 1) if scale > 1 else g
