"""Invariants of the expanding energy network and of its frozen sampler copy."""

import pytest
import torch
import torch.nn.functional as F

from cfebm.config import ConfigError, ModelConfig, cifar10_release
from cfebm.frozen import FrozenEnergy
from cfebm.langevin import energy_and_grad
from cfebm.layers import EqConv2d
from cfebm.model import EnergyNet, warm_start

SMALL = ModelConfig(channels=3, resolutions=(4, 8, 16), base_width=4, width_cap=4)
SMALL_SN = ModelConfig(channels=1, resolutions=(8, 16), base_width=4, spectral_norm=True)


def _images(n, cfg, stage, seed=0):
    r = cfg.resolutions[stage]
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, cfg.channels, r, r), generator=g) * 2 - 1


def _grown(cfg, stage, seed=0):
    torch.manual_seed(seed)
    return EnergyNet(cfg, stage=stage).eval()


@pytest.mark.parametrize("cfg", [SMALL, SMALL_SN], ids=["eqlr", "spectral"])
def test_beta_zero_is_previous_stage_on_pooled_images(cfg):
    prev = _grown(cfg, 0)
    for _ in range(1, cfg.num_stages):
        model = warm_start(prev).eval()
        x = _images(6, cfg, model.stage)
        with torch.no_grad():
            assert torch.allclose(model(x, beta=0.0), prev(F.avg_pool2d(x, 2)), atol=1e-6)
            # and the fade actually mixes in the new block for beta > 0
            assert not torch.allclose(model(x, beta=0.5), prev(F.avg_pool2d(x, 2)), atol=1e-4)
        prev = model


def test_beta_one_ignores_the_fade_path():
    model = _grown(SMALL, 2)
    x = _images(4, SMALL, 2)
    with torch.no_grad():
        before = model(x, beta=1.0)
        model.from_image["r8"].weight.add_(torch.randn_like(model.from_image["r8"].weight))
        assert torch.equal(model(x, beta=1.0), before)
        assert not torch.allclose(model(x, beta=0.5), before)


def test_energies_do_not_depend_on_batch_size_or_order():
    model = _grown(SMALL, 2)
    x = _images(10, SMALL, 2)
    with torch.no_grad():
        full = model(x, beta=0.3)
        parts = torch.cat([model(x[:3], beta=0.3), model(x[3:], beta=0.3)])
        perm = torch.randperm(10)
        assert torch.allclose(full, parts, atol=1e-5)
        assert torch.allclose(model(x[perm], beta=0.3), full[perm], atol=1e-5)
        assert torch.allclose(model(x[4:5], beta=0.3), full[4:5], atol=1e-5)


def test_warm_start_copies_every_shared_parameter_and_adds_fresh_layers():
    prev = _grown(SMALL, 1)
    torch.manual_seed(123)
    model = warm_start(prev)
    old = prev.state_dict()
    new = model.state_dict()
    assert set(old) < set(new)
    for k, v in old.items():
        assert torch.equal(new[k], v), k
    added = set(new) - set(old)
    assert {k.split(".")[1] for k in added} == {"r16"}  # from_image.r16 and blocks.r16 only
    assert any(new[k].abs().sum() > 0 for k in added if k.endswith("weight"))
    assert model.stage == prev.stage + 1


def test_grow_past_last_stage_and_wrong_resolution_are_clear_errors():
    model = _grown(SMALL, 2)
    with pytest.raises(ValueError, match="cannot grow past"):
        model.grow()
    with pytest.raises(ValueError, match="takes 16x16"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not grown"):
        EnergyNet(SMALL)(torch.zeros(1, 3, 8, 8), stage=1)


def test_from_state_round_trip():
    model = _grown(SMALL_SN, 1)
    x = _images(3, SMALL_SN, 1)
    again = EnergyNet.from_state(SMALL_SN, model.state_dict()).eval()
    assert again.stage == 1
    with torch.no_grad():
        assert torch.equal(again(x, beta=0.7), model(x, beta=0.7))


def test_spectral_norm_converges_to_unit_singular_value():
    torch.manual_seed(0)
    conv = EqConv2d(8, 16, 3, padding=1, spectral=True).train()
    for _ in range(50):
        w = conv.effective_weight()
    sigma = torch.linalg.matrix_norm(w.detach().flatten(1), ord=2)
    assert abs(sigma.item() - 1.0) < 1e-3
    # eval mode does not move the power-iteration vector: the function is fixed
    conv.eval()
    u = conv.u.clone()
    conv.effective_weight()
    assert torch.equal(conv.u, u)


@pytest.mark.parametrize("activation", ["swish", "gelu", "elu", "leaky_relu"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL_SN], ids=["eqlr", "spectral"])
def test_frozen_energy_equals_reference_forward_and_input_gradient(cfg, activation):
    cfg = ModelConfig(**{**cfg.__dict__, "activation": activation})
    model = _grown(cfg, cfg.num_stages - 1)
    for stage in range(model.stage + 1):
        for beta in (0.0, 0.4, 1.0):
            x = _images(5, cfg, stage, seed=stage)
            e_ref, g_ref = energy_and_grad(lambda z, s=stage, b=beta: model(z, s, b), x)
            for cl in (True, False):
                e, g = energy_and_grad(FrozenEnergy(model, stage, beta, channels_last=cl), x)
                assert torch.allclose(e, e_ref, rtol=1e-4, atol=1e-5), (stage, beta)
                assert torch.allclose(g, g_ref, rtol=1e-3, atol=1e-5 * g_ref.abs().max())


def test_frozen_energy_bf16_is_close_and_returns_float32():
    model = _grown(SMALL, 2)
    x = _images(8, SMALL, 2)
    e_ref, _ = energy_and_grad(FrozenEnergy(model), x)
    e, g = energy_and_grad(FrozenEnergy(model, dtype=torch.bfloat16), x)
    assert e.dtype == torch.float32 and g.dtype == torch.float32
    assert (e - e_ref).abs().max() < 0.05 * e_ref.abs().max() + 0.05


def test_frozen_energy_has_no_trainable_state():
    model = _grown(SMALL, 1).train()
    frozen = FrozenEnergy(model)
    x = _images(2, SMALL, 1).requires_grad_(True)
    frozen(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_release_network_shapes():
    cfg = cifar10_release().model
    model = EnergyNet(cfg, stage=2)
    assert [cfg.width(r) for r in (32, 16, 8, 4)] == [32, 64, 128, 128]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2,)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"resolutions": (4, 8, 32)}, "double"),
        ({"resolutions": (6, 12)}, "power of two"),
        ({"resolutions": (2, 4)}, "power of two >= 4"),
        ({"activation": "tanh"}, "activation"),
        ({"channels": 0}, "channels"),
    ],
)
def test_impossible_model_configs_name_the_option(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)
