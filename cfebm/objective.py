"""The maximum-likelihood objective and divergence detection (paper Sec. 3, Eq. 2)."""

from __future__ import annotations

import math

import torch


def contrastive_loss(
    e_data: torch.Tensor, e_sample: torch.Tensor, energy_penalty: float = 0.0
) -> torch.Tensor:
    """mean E(x_data) - mean E(x_sample) (+ c * mean(E(x_data)^2 + E(x_sample)^2)).

    Its gradient is the Monte-Carlo estimate of the negative log-likelihood gradient:
    lower the energy of data, raise the energy of the model's samples. The optional
    magnitude penalty (c = 0 in the release) keeps energies near zero.
    """
    loss = e_data.mean() - e_sample.mean()
    if energy_penalty:
        loss = loss + energy_penalty * (e_data.pow(2).mean() + e_sample.pow(2).mean())
    return loss


def divergence(loss: float, e_data: float, e_sample: float, threshold: float) -> str | None:
    """Why this step counts as diverged (None if it does not).

    MCMC-trained EBMs diverge by energies running away or turning NaN; the release stops at
    |loss| > 1000. Callers must not step the optimizer, or save the model, on a diverged
    step.
    """
    values = {"loss": loss, "energy(data)": e_data, "energy(samples)": e_sample}
    for name, v in values.items():
        if not math.isfinite(v):
            return f"{name} is {v}"
    for name, v in values.items():
        if abs(v) > threshold:
            return f"|{name}| = {abs(v):.4g} exceeds the divergence threshold {threshold:g}"
    return None
