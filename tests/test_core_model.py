"""Invariants of the stage networks, the frozen coarse-to-fine model and the fused sampler
energy; the release network and its parametrisation."""

import pytest
import torch
import torch.nn.functional as F

from cfebm.config import ConfigError, ModelConfig, cifar10_release
from cfebm.frozen import FrozenEnergy, stage_energies
from cfebm.langevin import energy_and_grad
from cfebm.layers import EqConv2d
from cfebm.model import CoarseToFineEBM, EnergyNet, warm_start

SMALL = ModelConfig(channels=3, resolutions=(4, 8, 16), base_width=4, width_cap=4)
SMALL_SN = ModelConfig(channels=1, resolutions=(8, 16), base_width=4, spectral_norm=True)
RELEASE = ModelConfig(channels=3, resolutions=(8, 16, 32), network="release", base_width=4)
NETWORKS = [SMALL, SMALL_SN, RELEASE]
IDS = ["compact", "compact-sn", "release"]


def _images(n, cfg, stage, seed=0):
    r = cfg.resolutions[stage]
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, cfg.channels, r, r), generator=g) * 2 - 1


def _model(cfg, stage, seed=0) -> CoarseToFineEBM:
    """A model grown to ``stage``, its spectral norms settled by a few power iterations (as
    training leaves them: fresh random vectors give sigma << 1 and huge weights)."""
    torch.manual_seed(seed)
    model = CoarseToFineEBM(cfg)
    for _ in range(stage):
        model.grow()
    for layer in model.modules():
        if getattr(layer, "spectral", False):
            for _ in range(10):
                layer.effective_weight(update=True)
    return model.eval()


@pytest.mark.parametrize("cfg", NETWORKS, ids=IDS)
def test_beta_zero_is_the_previous_stage_on_pooled_images(cfg):
    model = _model(cfg, cfg.num_stages - 1)
    for t in range(1, cfg.num_stages):
        x = _images(6, cfg, t)
        with torch.no_grad():
            prev = model.nets[t - 1](F.avg_pool2d(x, 2))
            assert torch.allclose(model.nets[t](x, beta=0.0), prev, atol=1e-5)
            # and the fade actually mixes in the new block for beta > 0
            assert not torch.allclose(model.nets[t](x, beta=0.5), prev, atol=1e-4)


def test_beta_one_ignores_the_fade_path():
    net = _model(SMALL, 2).current
    x = _images(4, SMALL, 2)
    with torch.no_grad():
        before = net(x, beta=1.0)
        net.from_image["r8"].weight.add_(torch.randn_like(net.from_image["r8"].weight))
        assert torch.equal(net(x, beta=1.0), before)
        assert not torch.allclose(net(x, beta=0.5), before)


def test_energies_do_not_depend_on_batch_size_or_order():
    net = _model(SMALL, 2).current
    x = _images(10, SMALL, 2)
    with torch.no_grad():
        full = net(x, beta=0.3)
        parts = torch.cat([net(x[:3], beta=0.3), net(x[3:], beta=0.3)])
        perm = torch.randperm(10)
        assert torch.allclose(full, parts, atol=1e-5)
        assert torch.allclose(net(x[perm], beta=0.3), full[perm], atol=1e-5)


def test_warm_start_copies_every_shared_layer_and_adds_the_finer_ones_fresh():
    prev = _model(SMALL, 1).current
    torch.manual_seed(123)
    net = warm_start(prev)
    old, new = prev.state_dict(), net.state_dict()
    shared = set(old) & set(new)
    for k in shared:
        assert torch.equal(new[k], old[k]), k
    added = set(new) - set(old)
    assert {k.split(".")[1] for k in added} == {"r16"}  # from_image.r16 and blocks.r16 only
    # the input conv two stages back is not carried along: stage 2 never reads 4x4 images
    assert set(old) - set(new) == {"from_image.r4.weight", "from_image.r4.bias"}
    assert net.stage == prev.stage + 1 and net.resolution == 16


def test_growing_freezes_the_finished_stage():
    model = _model(SMALL, 0).train()
    first = model.nets[0]
    model.grow()
    assert model.stage == 1 and model.nets[0] is first
    assert not any(p.requires_grad for p in model.nets[0].parameters())
    assert all(p.requires_grad for p in model.current.parameters())
    model.train()  # training mode reaches the current stage only
    assert model.current.training and not model.nets[0].training


def test_grow_past_the_last_stage_and_wrong_sizes_are_clear_errors():
    model = _model(SMALL, 2)
    with pytest.raises(ValueError, match="cannot grow past"):
        model.grow()
    with pytest.raises(ValueError, match="takes 16x16"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not trained"):
        _model(SMALL, 0)(torch.zeros(1, 3, 8, 8), stage=1)
    with pytest.raises(ConfigError, match="channels is not set"):
        EnergyNet(ModelConfig())


def test_from_state_round_trip():
    model = _model(SMALL_SN, 1)
    x = _images(3, SMALL_SN, 1)
    again = CoarseToFineEBM.from_state(SMALL_SN, model.state_dict()).eval()
    assert again.stage == 1
    with torch.no_grad():
        assert torch.equal(again(x, beta=0.7), model(x, beta=0.7))


def test_spectral_norm_is_exactly_torchs():
    """The release normalises its convolutions with torch.nn.utils.spectral_norm: same
    weights and power-iteration vectors give bit-identical outputs, in training (one
    power iteration per forward) and in evaluation (none)."""
    torch.manual_seed(0)
    ours = EqConv2d(4, 6, 3, padding=1, equalized=False, spectral=True, init="torch")
    ref = torch.nn.Conv2d(4, 6, 3, padding=1)
    ref.weight.data.copy_(ours.weight.data)
    ref.bias.data.copy_(ours.bias.data)
    ref = torch.nn.utils.spectral_norm(ref)
    ref.weight_u.data.copy_(ours.u)
    ref.weight_v.data.copy_(ours.v)
    x = torch.randn(2, 4, 5, 5)
    for training in (True, True, False, True, False):
        ours.train(training)
        ref.train(training)
        assert torch.equal(ours(x), ref(x)), training
    for _ in range(100):
        w = ours.train().effective_weight()
    sigma = torch.linalg.matrix_norm(w.detach().flatten(1), ord=2)
    assert abs(sigma.item() - 1.0) < 1e-3


def test_release_parametrisation_and_widths():
    cfg = cifar10_release().model
    model = _model(cfg, 2)
    assert [cfg.width(r) for r in (32, 16, 8, 4)] == [64, 128, 128, 128]
    net = model.current
    block32, head = net.blocks["r32"], net.head
    assert block32.conv1.weight.shape == (128, 64, 3, 3)  # maps straight to the output width
    for conv in (block32.conv1, block32.conv2, head.conv1, head.conv2):
        assert conv.spectral and conv.scale == 1.0  # spectral norm, no equalised lr
    for layer in (block32.skip, net.from_image["r32"], head.linear):
        assert not layer.spectral and layer.scale != 1.0  # equalised lr alone
    assert block32.skip.bias is not None
    # PyTorch's default init on the spectrally normalised convs: |w| <= 1 / sqrt(fan_in)
    assert block32.conv2.weight.abs().max() <= 1 / (128 * 9) ** 0.5
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2,)


@pytest.mark.parametrize("activation", ["swish", "gelu", "elu", "leaky_relu"])
@pytest.mark.parametrize("cfg", NETWORKS, ids=IDS)
def test_frozen_energy_equals_the_reference_forward_and_input_gradient(cfg, activation):
    cfg = ModelConfig(**{**cfg.__dict__, "activation": activation})
    model = _model(cfg, cfg.num_stages - 1)
    for t, net in enumerate(model.nets):
        for beta in (0.0, 0.4, 1.0):
            x = _images(5, cfg, t, seed=t)
            e_ref, g_ref = energy_and_grad(lambda z, n=net, b=beta: n(z, b), x)
            for cl in (True, False):
                e, g = energy_and_grad(FrozenEnergy(net, beta, channels_last=cl), x)
                assert torch.allclose(e, e_ref, rtol=1e-4, atol=1e-5), (t, beta)
                assert torch.allclose(g, g_ref, rtol=1e-3, atol=1e-5 * g_ref.abs().max())


def test_stage_energies_are_each_stages_own_network():
    model = _model(SMALL, 2)
    energies = stage_energies(model, beta=0.5)
    assert [e.stage for e in energies] == [0, 1, 2] and [e.beta for e in energies] == [1, 1, 0.5]
    x = _images(3, SMALL, 1)
    with torch.no_grad():
        assert torch.allclose(energies[1](x), model.nets[1](x), atol=1e-5)


def test_frozen_energy_bf16_is_close_and_returns_float32():
    net = _model(SMALL, 2).current
    x = _images(8, SMALL, 2)
    e_ref, _ = energy_and_grad(FrozenEnergy(net), x)
    e, g = energy_and_grad(FrozenEnergy(net, dtype=torch.bfloat16), x)
    assert e.dtype == torch.float32 and g.dtype == torch.float32
    assert (e - e_ref).abs().max() < 0.05 * e_ref.abs().max() + 0.05


def test_frozen_energy_has_no_trainable_state():
    net = _model(SMALL, 1).current.train()
    frozen = FrozenEnergy(net)
    x = _images(2, SMALL, 1).requires_grad_(True)
    frozen(x).sum().backward()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"resolutions": (4, 8, 32)}, "double"),
        ({"resolutions": (6, 12)}, "power of two"),
        ({"resolutions": (2, 4)}, "power of two >= 4"),
        ({"activation": "tanh"}, "activation"),
        ({"channels": 0}, "channels"),
        ({"network": "resnet"}, "network"),
        ({"network": "release", "base_width": 3, "resolutions": (8, 16, 32, 64, 128)}, "whole"),
    ],
)
def test_impossible_model_configs_name_the_option(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)
