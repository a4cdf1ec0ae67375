"""Schedules: Langevin step sizes and noise scales per step, and the fade coefficient beta.

Each ``get_*`` returns a float64 CPU tensor with one value per Langevin step, in the style
of k-diffusion's ``get_sigmas_*``; samplers take them as arguments.
"""

from __future__ import annotations

import torch

from .config import SamplerConfig


def get_step_sizes_constant(n: int, step_size: float) -> torch.Tensor:
    """eta_k = step_size for k < n."""
    return torch.full((n,), float(step_size), dtype=torch.float64)


def get_noise_scales_constant(n: int, noise: float) -> torch.Tensor:
    """sigma_k = noise for k < n."""
    return torch.full((n,), float(noise), dtype=torch.float64)


def get_noise_scales_linear(n: int, start: float, end: float) -> torch.Tensor:
    """sigma_k decays linearly from ``start`` (k = 0) to ``end`` (k = n - 1)."""
    return torch.linspace(float(start), float(end), n, dtype=torch.float64)


def chain_schedules(
    cfg: SamplerConfig, num_stages: int, first: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-stage (step sizes, noise scales) for a coarse-to-fine chain over ``num_stages``
    stages, the first being stage ``first`` (K_s steps each: ``cfg.k(s)``).

    With ``noise_span="chain"`` the linear noise decay runs once over all the chain's
    steps (the release: 0.015 -> 0 over the whole chain); with ``"stage"`` it restarts in
    every stage.
    """
    ks = [cfg.k(first + i) for i in range(num_stages)]
    if cfg.noise_schedule == "constant":
        noise = list(get_noise_scales_constant(sum(ks), cfg.noise_start).split(ks))
    elif cfg.noise_span == "chain":
        noise = list(get_noise_scales_linear(sum(ks), cfg.noise_start, cfg.noise_end).split(ks))
    else:
        noise = [get_noise_scales_linear(k, cfg.noise_start, cfg.noise_end) for k in ks]
    return [get_step_sizes_constant(k, cfg.step_size) for k in ks], noise


def fade_beta(images_seen: int, fade_images: int, stage: int) -> float:
    """beta for the Expand block after ``images_seen`` images of ``stage``'s training.

    Ramps linearly 0 -> 1 over ``fade_images`` (the fade phase), then stays 1 (the stable
    phase). Stage 0 has nothing to fade in: beta = 1.
    """
    if stage == 0 or fade_images <= 0:
        return 1.0
    return min(1.0, images_seen / fade_images)
