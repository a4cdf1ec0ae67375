"""Langevin samplers: reference behaviour on a Gaussian, masks, the coarse-to-fine chain."""

import math

import pytest
import torch

from cfebm.config import ModelConfig, SamplerConfig
from cfebm.langevin import energy_and_grad, sample_coarse_to_fine, sample_langevin, upsample2x
from cfebm.model import CoarseToFineEBM, EnergyNet
from cfebm.sampling import sample
from cfebm.schedules import (
    chain_schedules,
    fade_beta,
    get_noise_scales_constant,
    get_noise_scales_linear,
    get_step_sizes_constant,
)


def gaussian_energy(mu: float, std: float):
    def energy(x):
        return ((x - mu) ** 2).flatten(1).sum(1) / (2 * std**2)

    return energy


def test_long_chain_on_gaussian_energy_matches_mean_and_variance():
    mu, std = 0.3, 0.5
    eta = 2e-3 * std**2  # small steps: discretisation bias ~ eta / std^2
    n_steps = 3000  # ~ 3000 * 2e-3 = 6 relaxation times
    x0 = torch.full((4000, 1, 2, 2), -2.0)  # far from the mode
    g = torch.Generator().manual_seed(0)
    x = sample_langevin(
        gaussian_energy(mu, std),
        x0,
        get_step_sizes_constant(n_steps, eta),
        get_noise_scales_constant(n_steps, math.sqrt(2 * eta)),
        generator=g,
        clamp=None,
    )
    flat = x.flatten()
    assert abs(flat.mean().item() - mu) < 0.02
    assert abs(flat.std().item() - std) < 0.02


def test_wrong_noise_gives_wrong_variance():
    # The same chain with half the noise must not pass the variance check (test can fail).
    mu, std, eta, n = 0.0, 0.5, 5e-4, 3000
    x = sample_langevin(
        gaussian_energy(mu, std),
        torch.zeros(2000, 1, 2, 2),
        get_step_sizes_constant(n, eta),
        get_noise_scales_constant(n, 0.5 * math.sqrt(2 * eta)),
        generator=torch.Generator().manual_seed(0),
        clamp=None,
    )
    assert abs(x.std().item() - std) > 0.1


def grown(cfg, stage):
    model = CoarseToFineEBM(cfg)
    for _ in range(stage):
        model.grow()
    return model.eval()


def test_chain_without_coarse_to_fine_starts_at_the_stage_resolution():
    torch.manual_seed(0)
    model = grown(ModelConfig(channels=1, resolutions=(4, 8), base_width=4), 1)
    seen = []
    x = sample(
        model,
        3,
        SamplerConfig(steps=4, coarse_to_fine=False),
        callback=lambda d: seen.append(d["x"].shape[-1]),
    )
    assert x.shape == (3, 1, 8, 8) and seen == [8] * 8  # (s + 1) K steps of E_s alone


def test_chain_lowers_energy_of_noise_and_respects_clamp():
    torch.manual_seed(0)
    model = EnergyNet(ModelConfig(channels=1, resolutions=(4, 8), base_width=4), stage=1).eval()
    energies = []
    x = torch.rand(16, 1, 8, 8) * 2 - 1

    def energy(z):
        return model(z)

    e0, _ = energy_and_grad(energy, x)
    out = sample_langevin(
        energy,
        x,
        get_step_sizes_constant(30, 0.05),
        torch.zeros(30),
        callback=lambda d: energies.append(d["energy"].mean().item()),
    )
    e1, _ = energy_and_grad(energy, out)
    assert e1.mean() < e0.mean()
    assert len(energies) == 30 and energies[-1] < energies[0]
    assert out.min() >= -1 and out.max() <= 1


def test_mask_keeps_known_pixels_exactly():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    mask = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:6, 2:6] = True
    out = sample_langevin(
        gaussian_energy(0.9, 0.1),
        x,
        get_step_sizes_constant(20, 0.001),
        get_noise_scales_constant(20, 0.01),
        generator=torch.Generator().manual_seed(1),
        mask=mask,
    )
    known = ~mask.expand_as(x)
    assert torch.equal(out[known], x[known])
    assert (out[~known] - x[~known]).abs().mean() > 0.1  # the free pixels did move


def test_sampling_takes_no_parameter_gradients_and_returns_no_graph():
    torch.manual_seed(0)
    model = grown(ModelConfig(channels=1, resolutions=(4, 8), base_width=4), 1).train()
    x = sample(model, 4, SamplerConfig(steps=3), generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())
    assert x.grad_fn is None and not x.requires_grad
    # same through the generic path with a live module as energy
    y = sample_langevin(lambda z: model(z), x, [0.1] * 3, [0.0] * 3)
    assert all(p.grad is None for p in model.parameters())
    assert y.grad_fn is None


def test_coarse_to_fine_chain_resolutions_and_callback():
    torch.manual_seed(0)
    cfg = ModelConfig(channels=3, resolutions=(4, 8, 16), base_width=4)
    model = grown(cfg, 2)
    seen = []
    x = sample(
        model,
        5,
        SamplerConfig(steps=4),
        beta=0.5,
        generator=torch.Generator().manual_seed(0),
        callback=lambda d: seen.append((d["stage"], d["k"], d["x"].shape[-1])),
    )
    assert x.shape == (5, 3, 16, 16)
    finals = [(s, r) for s, k, r in seen if k == -1]
    assert finals == [(0, 4), (1, 8), (2, 16)]
    assert len(seen) == 3 * 4 + 3
    # a chain started from images at 8x8 runs only the stages from 8 up
    seen.clear()
    y = sample(
        model,
        2,
        SamplerConfig(steps=2),
        x_init=torch.zeros(2, 3, 8, 8),
        callback=lambda d: seen.append(d["stage"]),
    )
    assert y.shape == (2, 3, 16, 16) and max(seen) == 1
    with pytest.raises(ValueError, match="not a stage resolution"):
        sample(model, 2, SamplerConfig(steps=1), x_init=torch.zeros(2, 3, 32, 32))


def test_same_seed_same_samples():
    torch.manual_seed(0)
    model = grown(ModelConfig(channels=1, resolutions=(4, 8), base_width=4), 1)
    a = sample(model, 3, SamplerConfig(steps=3), generator=torch.Generator().manual_seed(7))
    b = sample(model, 3, SamplerConfig(steps=3), generator=torch.Generator().manual_seed(7))
    c = sample(model, 3, SamplerConfig(steps=3), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_upsample_is_right_inverse_of_mean_pooling():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(torch.nn.functional.avg_pool2d(upsample2x(x), 2), x)


def test_coarse_to_fine_requires_one_schedule_per_energy():
    with pytest.raises(ValueError, match="one step-size"):
        sample_coarse_to_fine([lambda z: z.sum((1, 2, 3))], torch.zeros(1, 1, 4, 4), [], [])


def test_schedules():
    lin = get_noise_scales_linear(5, 0.015, 0.0)
    assert lin[0] == 0.015 and lin[-1] == 0.0 and torch.all(lin[1:] < lin[:-1])
    steps, noise = chain_schedules(SamplerConfig(steps=4, noise_span="chain"), 3)
    assert len(steps) == len(noise) == 3
    assert noise[0][0] == 0.015 and noise[-1][-1] == 0.0
    assert torch.all(torch.cat(noise)[1:] < torch.cat(noise)[:-1])  # one decay, whole chain
    _, per_stage = chain_schedules(SamplerConfig(steps=4, noise_span="stage"), 2)
    assert torch.equal(per_stage[0], per_stage[1])
    _, const = chain_schedules(SamplerConfig(steps=3, noise_schedule="constant"), 2)
    assert torch.all(torch.cat(const) == 0.015)
    assert fade_beta(0, 100, 0) == 1.0
    assert fade_beta(0, 100, 1) == 0.0
    assert fade_beta(25, 100, 1) == 0.25
    assert fade_beta(500, 100, 2) == 1.0


def test_stage_steps_give_each_stage_its_own_chain_length():
    torch.manual_seed(0)
    cfg = ModelConfig(channels=1, resolutions=(4, 8, 16), base_width=4)
    model = grown(cfg, 2)
    sampler = SamplerConfig(steps=9, stage_steps=[5, 3, 2], noise_start=0.02)
    steps, noise = chain_schedules(sampler, 3)
    assert [len(s) for s in steps] == [5, 3, 2] and [len(n) for n in noise] == [5, 3, 2]
    whole = torch.cat(noise)  # one linear decay over the 10 steps of the whole chain
    assert torch.allclose(whole, get_noise_scales_linear(10, 0.02, 0.0))
    # a chain that starts at 8x8 (stage 1) takes the K of stages 1 and 2
    assert [len(s) for s in chain_schedules(sampler, 2, first=1)[0]] == [3, 2]
    seen = []
    sample(model, 2, sampler, callback=lambda d: seen.append((d["stage"], d["k"])))
    assert [sum(1 for s, k in seen if s == t and k >= 0) for t in range(3)] == [5, 3, 2]
    assert sampler.chain_steps(2) == 10 and sampler.k(7) == 2  # the last entry goes on
    with pytest.raises(ValueError, match="stage_steps"):
        SamplerConfig(stage_steps=[3, 0])
