"""Compute per image, counted by torch's FLOP counter (convolutions and matrix products).

Training cost is measured in FLOPs so that runs of different shapes (coarse to fine, the
finest resolution directly, chains from noise) can be stopped at the same compute
(``make ablation``) and benchmarks can compare kernels with the machine's peak.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .langevin import Energy, energy_and_grad


def energy_grad_flops(energy: Energy, shape: tuple[int, ...], device=None) -> int:
    """FLOPs of one Langevin step's E(x) and dE/dx for one image of ``shape`` [C, r, r]."""
    x = torch.zeros((1, *shape), device=device)
    with FlopCounterMode(display=False) as counter:
        energy_and_grad(energy, x)
    return int(counter.get_total_flops())


def loss_step_flops(net: torch.nn.Module, shape: tuple[int, ...], beta: float = 1.0) -> int:
    """FLOPs of the loss forward and the parameter gradient for one image (no ``.grad`` is
    touched)."""
    device = next(net.parameters()).device
    params = [p for p in net.parameters() if p.requires_grad]
    x = torch.zeros((1, *shape), device=device)
    training = net.training
    net.eval()  # no spectral-norm power iteration: counting must not change the state
    try:
        with FlopCounterMode(display=False) as counter:
            e = net(x, beta=beta).sum()
            torch.autograd.grad(e, params, allow_unused=True)
    finally:
        net.train(training)
    return int(counter.get_total_flops())
