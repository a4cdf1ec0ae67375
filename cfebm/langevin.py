"""Short-run Langevin samplers: pure functions of (energy, x, schedule, generator, callback).

An ``energy`` is any callable x [B, ...] -> energies [B]; usually a
:class:`cfebm.frozen.FrozenEnergy`, whose weights need no gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Energy = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def energy_and_grad(energy: Energy, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E(x) [B] and dE/dx, with gradients taken with respect to the input only.

    ``torch.autograd.grad`` with ``inputs=x`` computes no parameter gradient even when the
    energy has trainable parameters, and the graph is freed right after.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy(x)
        (g,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), g


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sample_langevin(
    energy: Energy,
    x: torch.Tensor,
    step_sizes: torch.Tensor | Sequence[float],
    noise_scales: torch.Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    callback: Callback | None = None,
) -> torch.Tensor:
    """Langevin dynamics x <- x - eta_k * dE/dx + sigma_k * N(0, I), then clamp.

    For eta_k = eta and sigma_k = sqrt(2 eta) this samples exp(-E) as eta -> 0 (Neal
    2011); short-run EBMs use far less noise. ``mask`` (bool, broadcastable to x) marks the
    pixels that move: the others are reset to their initial values after every step
    (inpainting). ``callback`` receives {"k", "x", "energy", "grad"} after every step.
    """
    etas = [float(v) for v in step_sizes]
    sigmas = [float(v) for v in noise_scales]
    if len(etas) != len(sigmas):
        raise ValueError(f"{len(etas)} step sizes but {len(sigmas)} noise scales")
    x = x.detach()
    known = x.clone() if mask is not None else None
    for k, (eta, sigma) in enumerate(zip(etas, sigmas)):
        e, g = energy_and_grad(energy, x)
        x = x - eta * g
        if sigma > 0:
            x = x + sigma * _noise_like(x, generator)
        if clamp is not None:
            x = x.clamp(*clamp)
        if known is not None:
            x = torch.where(mask, x, known)
        if callback is not None:
            callback({"k": k, "x": x, "energy": e, "grad": g})
    return x


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2: the exact right inverse of 2x2 mean pooling."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def sample_coarse_to_fine(
    energies: Sequence[Energy],
    x: torch.Tensor,
    step_sizes: Sequence[torch.Tensor],
    noise_scales: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    upsample_noise: float = 0.0,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    callback: Callback | None = None,
) -> torch.Tensor:
    """The coarse-to-fine chain (paper Sec. 3.2): Langevin with energies[0] on x, upsample
    x2 (plus optional noise), Langevin with energies[1], ... ; returns the final state.

    ``callback`` receives the Langevin dict with ``"stage"`` (index into ``energies``) added,
    and one dict with ``"k": -1`` holding each stage's final state.
    """
    n = len(energies)
    if not (len(step_sizes) == len(noise_scales) == n):
        raise ValueError("one step-size and one noise schedule per energy are needed")
    for i, energy in enumerate(energies):
        if i > 0:
            x = upsample2x(x)
            if upsample_noise > 0:
                x = x + upsample_noise * _noise_like(x, generator)
                if clamp is not None:
                    x = x.clamp(*clamp)
        cb = None if callback is None else (lambda d, i=i: callback({**d, "stage": i}))
        x = sample_langevin(
            energy,
            x,
            step_sizes[i],
            noise_scales[i],
            generator=generator,
            clamp=clamp,
            callback=cb,
        )
        if callback is not None:
            callback({"k": -1, "stage": i, "x": x})
    return x
