"""Sampling from a trained (or training) model: the coarse-to-fine chain up to a stage,
batched draws, and the chain's snapshots for people to look at."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import SamplerConfig
from .device import energy_options
from .frozen import FrozenEnergy, stage_energies
from .langevin import Callback, Energy, sample_coarse_to_fine, sample_langevin
from .model import CoarseToFineEBM
from .schedules import chain_schedules, get_noise_scales_linear, get_step_sizes_constant


def uniform_noise(
    n: int, channels: int, resolution: int, generator: torch.Generator | None, device=None
) -> torch.Tensor:
    """U[-1, 1] images [n, C, r, r]: where every chain starts."""
    u = torch.rand((n, channels, resolution, resolution), generator=generator, device=device)
    return u * 2 - 1


def sample(
    model: CoarseToFineEBM,
    n: int,
    cfg: SamplerConfig,
    *,
    stage: int | None = None,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    callback: Callback | None = None,
    energies: Sequence[Energy] | None = None,
) -> torch.Tensor:
    """n samples [n, C, r_s, r_s] in [-1, 1] from stage s (default: the model's current).

    Chains start from uniform noise at the coarsest resolution, or from ``x_init`` (e.g.
    source-domain images for translation) at whichever stage resolution it has; they then
    run K steps per stage up to s, each stage t with its own frozen energy E_t, the current
    stage at fade coefficient ``beta``. ``energies`` (E_0..E_s, as :func:`stage_energies`
    builds them) saves rebuilding them when the caller keeps them. With
    ``cfg.coarse_to_fine`` false, chains start from noise at r_s and run (s + 1) K steps of
    E_s alone. The energies compute in ``cfg.precision`` and run as ``cfg.compile`` says.
    """
    s = model.stage if stage is None else stage
    device = model.device
    if not cfg.coarse_to_fine:
        if energies:
            energy = energies[-1]
        else:
            energy = FrozenEnergy(model.nets[s], beta, **energy_options(cfg, device))
        x = uniform_noise(n, model.cfg.channels, model.resolution(s), generator, device)
        k = cfg.chain_steps(s)
        return sample_langevin(
            energy,
            x if x_init is None else x_init.to(device),
            get_step_sizes_constant(k, cfg.step_size),
            _single_chain_noise(cfg, k),
            generator=generator,
            clamp=(-1.0, 1.0) if cfg.clamp else None,
            callback=callback,
        )
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
    if energies is None:
        kw = energy_options(cfg, device)  # (only here: a caller's energies have theirs)
        energies = stage_energies(model, s, beta, first_stage=first, **kw)
    else:
        energies = list(energies)[first : s + 1]
    steps, noise = chain_schedules(cfg, len(energies), first)
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


def _single_chain_noise(cfg: SamplerConfig, k: int) -> torch.Tensor:
    if cfg.noise_schedule == "constant":
        return torch.full((k,), float(cfg.noise_start), dtype=torch.float64)
    return get_noise_scales_linear(k, cfg.noise_start, cfg.noise_end)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 [0, 255] (round to nearest)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def draw(
    model: CoarseToFineEBM,
    sampler: SamplerConfig,
    num: int,
    *,
    batch: int = 256,
    seed: int = 0,
    stage: int | None = None,
    beta: float = 1.0,
    progress=None,
) -> np.ndarray:
    """``num`` uint8 samples [N, C, r, r] of ``stage``, in batches of ``batch`` chains;
    fixed by ``seed`` (the same seed gives the same images for any batch split of the
    same size). ``progress(done, total)`` is called after each batch."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    energies = stage_energies(model, stage, beta, **energy_options(sampler, model.device))
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        x = sample(model, n, sampler, stage=stage, beta=beta, generator=gen, energies=energies)
        out.append(to_uint8(x).cpu().numpy())
        if progress is not None:
            progress(start + n, num)
    return np.concatenate(out)


def chain_frames(
    model: CoarseToFineEBM,
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
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    start = model.resolution(0 if sampler.coarse_to_fine else model.stage)
    x0 = uniform_noise(chains, model.cfg.channels, start, gen, device)
    frames = [x0]

    def callback(d: dict) -> None:
        k = sampler.k(d.get("stage", 0))
        if d["k"] == -1 or d["k"] in {round(k * j / per_stage) - 1 for j in range(1, per_stage)}:
            frames.append(d["x"].detach().clone())

    sample(model, chains, sampler, beta=beta, generator=gen, x_init=x0, callback=callback)
    size = model.resolution()
    up = [F.interpolate(f.float(), size=(size, size), mode="nearest") for f in frames]
    return to_uint8(torch.stack(up, dim=1)).cpu().numpy()  # [chains, T, C, R, R]
