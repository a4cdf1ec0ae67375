"""The CUDA path, with ``cfebm`` alone (torch, numpy, fsspec): ``python -m pytest -m gpu``.

Skipped where there is no CUDA device. Each test compares the GPU computation with a
reference: the naive path of the benchmark (the network's own forward and autograd),
an uninterrupted run.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.langevin import BF16_TOLERANCE, FP32_TOLERANCE, build_model, check_equivalence
from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import CFEBMConfig, ModelConfig, SamplerConfig, TrainConfig, cifar10_release
from cfebm.device import energy_options
from cfebm.frozen import _COMPILED, FrozenEnergy, _energy
from cfebm.langevin import sample_langevin
from cfebm.loop import fit
from cfebm.sampling import sample
from cfebm.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 convs/matmuls would make fp32 on the GPU a reduced-precision computation."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.fixture(scope="module")
def release():
    """The release CIFAR-10 network grown to 32x32, spectral norm settled (as the
    benchmark builds it), and a batch of inputs, on the GPU."""
    model = build_model(cifar10_release(), stage=2, device="cuda").eval()
    return model, torch.rand(16, 3, 32, 32, device="cuda") * 2 - 1


@pytest.mark.parametrize("beta", [1.0, 0.4])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_energy_equals_the_naive_path_on_cuda(release, beta, channels_last):
    model, x = release
    energy = FrozenEnergy(model.current, beta, channels_last=channels_last)
    assert energy(x).device.type == "cuda"
    check_equivalence(model, energy, x, 2, beta, tolerance=FP32_TOLERANCE)


def test_bf16_energies_and_gradients_are_within_tolerance_on_cuda(release):
    model, x = release
    energy = FrozenEnergy(model.current, dtype=torch.bfloat16)
    assert energy(x).dtype == torch.float32  # energies leave in fp32 whatever the compute
    err_e, err_g = check_equivalence(model, energy, x, 2, tolerance=BF16_TOLERANCE)
    assert err_e > 0  # it did compute in reduced precision


def small_cfg() -> CFEBMConfig:
    return CFEBMConfig(
        model=ModelConfig(resolutions=(4, 8, 16), base_width=8),
        sampler=SamplerConfig(steps=5, noise_start=0.01),
        train=TrainConfig(
            batch_size={4: 16}, lr={4: 2e-3}, fade_images=64, stable_images=64, seed=5
        ),
    )


def data_on(device: str) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x16 = (torch.rand((64, 1, 16, 16), generator=g) * 255).round()
    x8 = F.avg_pool2d(x16, 2)
    return {16: x16.to(device), 8: x8.to(device), 4: F.avg_pool2d(x8, 2).to(device)}


def test_coarse_to_fine_training_resumes_exactly_on_cuda(tmp_path):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cfg, data = small_cfg(), data_on("cuda")
    straight = Trainer(cfg, data, device="cuda")
    fit(straight)
    first = Trainer(cfg, data, device="cuda")
    fit(first, max_steps=11)  # stops inside stage 1's fade
    assert first.state.stage == 1 and 0 < first.beta < 1
    save_checkpoint(first.state_dict(), str(tmp_path / "c.pt"))
    resumed = Trainer.from_checkpoint(load_checkpoint(str(tmp_path / "c.pt")), data, device="cuda")
    fit(resumed, resumed=True)
    assert resumed.state.stage == straight.state.stage == 2
    for (k, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(a, b), k
    g1, g2 = (torch.Generator("cuda").manual_seed(9) for _ in range(2))
    assert torch.equal(
        sample(resumed.model, 8, cfg.sampler, generator=g1),
        sample(straight.model, 8, cfg.sampler, generator=g2),
    )


def test_auto_settings_on_cuda_are_bf16_where_native_and_cuda_graphs():
    opts = energy_options(SamplerConfig(precision="auto", compile="auto"), "cuda")
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert opts == {
        "dtype": torch.bfloat16 if native else torch.float32,
        "compile": "reduce-overhead",
    }


def test_compiled_chain_with_cuda_graphs_equals_the_eager_chain(release):
    """The release network's 32x32 energy compiled in reduce-overhead mode (CUDA graphs):
    the same Langevin chain as eager up to float rounding, also after the energy is rebuilt
    with new weights (as every training step does)."""
    model, x = release
    steps, noise = [1.0] * 10, [0.01] * 10
    for _ in range(2):
        with torch.no_grad():
            for p in model.current.parameters():
                p.mul_(1.01)
        chains = []
        for mode in (None, "reduce-overhead"):
            energy = FrozenEnergy(model.current, compile=mode)
            gen = torch.Generator("cuda").manual_seed(3)
            chains.append(sample_langevin(energy, x, steps, noise, generator=gen))
        eager, compiled = chains
        assert torch.allclose(compiled, eager, atol=1e-4), (compiled - eager).abs().max()
    assert _COMPILED["reduce-overhead"] is not _energy  # compiled, not the eager fallback


def test_training_with_compiled_bf16_chains_runs_on_cuda():
    """A short coarse-to-fine training whose chains use the device's choices (auto)."""
    cfg = small_cfg()
    cfg = replace(cfg, sampler=replace(cfg.sampler, precision="auto", compile="auto"))
    trainer = Trainer(cfg, data_on("cuda"), device="cuda")
    fit(trainer)
    assert trainer.state.stage == 2
    x = sample(trainer.model, 8, cfg.sampler, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(x).all() and x.shape == (8, 1, 16, 16)
