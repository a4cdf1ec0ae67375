"""How the chains compute on the device at hand: bf16 only where the device has bf16 units
(cfebm.device), and the compiled energies (torch.compile) equal to the eager ones."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from cfebm.config import ConfigError, ModelConfig, SamplerConfig
from cfebm.device import compile_mode, energy_options, native_bf16, sampling_dtype
from cfebm.frozen import _COMPILED, FrozenEnergy, _energy
from cfebm.langevin import energy_and_grad, sample_langevin
from cfebm.model import CoarseToFineEBM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def run_capped_at_avx2(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` on this CPU computing as an AVX2-only one does (no bf16 units)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def capped_at_avx2() -> bool:
    return os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in {"avx2", "default"}


def test_auto_is_bf16_only_where_the_cpu_has_bf16_units():
    has_units = bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and not capped_at_avx2()
    assert native_bf16("cpu") == has_units
    expected = torch.bfloat16 if has_units else torch.float32
    assert sampling_dtype("auto", "cpu") == expected
    assert sampling_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="precision"):
        sampling_dtype("fp16", "cpu")


def test_an_instruction_set_capped_at_avx2_never_gets_bf16(caplog):
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA make this CPU compute as an AVX2-only one
    does, where bf16 is emulated (6x slower than fp32 in make bench): fp32 then, even when
    bf16 is asked for, with a warning."""
    code = (
        "import logging, torch; logging.basicConfig();"
        "from cfebm.device import sampling_dtype, native_bf16;"
        "print(native_bf16('cpu'), sampling_dtype('auto', 'cpu'), sampling_dtype('bf16', 'cpu'))"
    )
    done = run_capped_at_avx2(code)
    assert done.stdout.split() == ["False", "torch.float32", "torch.float32"]
    assert "has no bf16 units" in done.stderr


def test_compile_settings():
    assert compile_mode("auto", "cpu") is None  # eager on a CPU
    assert compile_mode("auto", "cuda") == "reduce-overhead"
    assert compile_mode("eager", "cuda") is None and compile_mode("default", "cpu") == "default"
    opts = energy_options(SamplerConfig(precision="fp32", compile="default"), "cpu")
    assert opts == {"dtype": torch.float32, "compile": "default"}
    with pytest.raises(ConfigError, match="sampler.compile"):
        SamplerConfig(compile="max")
    with pytest.raises(ConfigError, match="sampler.precision"):
        SamplerConfig(precision="half")


@pytest.mark.slow
def test_compiled_chain_equals_eager_and_compiles_once_for_new_weights_and_fade():
    """A stage's energy is rebuilt with new weights every training step and a new fade
    coefficient: the compiled energy (inductor on the CPU) must not recompile for either,
    and its Langevin chains equal the eager ones up to float rounding."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = CoarseToFineEBM(ModelConfig(resolutions=[4, 8], base_width=4, channels=1), stage=1)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    steps, noise = [1.0] * 4, [0.01] * 4
    _COMPILED.clear()
    torch._dynamo.reset()
    counters.clear()
    for beta in (0.3, 0.7):
        with torch.no_grad():
            for p in model.current.parameters():
                p.add_(0.05 * torch.randn_like(p))
        chains = []
        for mode in (None, "default"):
            energy = FrozenEnergy(model.current, beta, compile=mode)
            gen = torch.Generator().manual_seed(1)
            chains.append(sample_langevin(energy, x0, steps, noise, generator=gen))
            e, g = energy_and_grad(energy, x0)
            chains.append((e, g))
        eager, eager_eg, compiled, compiled_eg = chains
        assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
        for a, b in zip(compiled_eg, eager_eg):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # one graph: new weights, new beta
    # the chains above were the compiled ones, not the eager fallback (which inductor's
    # code needs under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU)
    assert _COMPILED["default"] is not _energy or capped_at_avx2()


def test_a_bf16_fallback_is_said_once_not_at_every_training_step():
    """On a CPU without bf16 units (capped at AVX2 here), ``precision: bf16`` falls back to
    fp32 with one warning when the trainer starts, not one per chain."""
    code = (
        "import logging, torch; logging.basicConfig();"
        "from cfebm.config import CFEBMConfig, ModelConfig, SamplerConfig, TrainConfig;"
        "from cfebm.loop import fit; from cfebm.trainer import Trainer;"
        "m = ModelConfig(resolutions=[4], base_width=4, channels=1);"
        "cfg = CFEBMConfig(m, SamplerConfig(steps=2, precision='bf16'),"
        " TrainConfig(batch_size={4: 4}, images={4: 16}));"
        "t = Trainer(cfg, {4: torch.zeros(8, 1, 4, 4)}); fit(t, max_steps=4);"
        "print(t.state.step, t.energy_options['dtype'])"
    )
    done = run_capped_at_avx2(code)
    assert done.stdout.split() == ["4", "torch.float32"]
    assert done.stderr.count("has no bf16 units") == 1, done.stderr


def test_a_compiled_energy_is_checked_against_eager_and_replaced_where_it_differs(
    monkeypatch, caplog
):
    """Generated code can be wrong on a machine (inductor under ATEN_CPU_CAPABILITY=avx2
    on an AVX-512 CPU gave energies of 1e33): the first call of each input shape compares
    energy and gradient with the eager ones, and a mismatch samples eagerly, with a warning."""
    torch.manual_seed(0)
    model = CoarseToFineEBM(ModelConfig(resolutions=[4, 8], base_width=4, channels=1), stage=1)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    calls = []

    def faithful(f, x):
        calls.append(x.shape)
        return _energy(f, x)

    monkeypatch.setattr("cfebm.frozen._VERIFIED", set())
    monkeypatch.setitem(_COMPILED, "default", faithful)
    energy = FrozenEnergy(model.current, 0.5, compile="default")
    expected, g_expected = energy_and_grad(FrozenEnergy(model.current, 0.5), x)
    e, g = energy_and_grad(energy, x)
    assert torch.allclose(e, expected) and torch.allclose(g, g_expected)
    energy_and_grad(energy, x)  # verified once per shape: no second comparison
    assert calls == [x.shape] * 3  # the check, then the two calls
    assert _COMPILED["default"] is faithful

    def wrong_gradient(f, x):  # same energies, a gradient twice as large
        e = _energy(f, x)
        return 2 * e - e.detach()

    monkeypatch.setitem(_COMPILED, "default", wrong_gradient)
    with caplog.at_level(logging.WARNING, logger="cfebm.frozen"):
        e, g = energy_and_grad(FrozenEnergy(model.current, 0.5, compile="default"), x[:4])
    assert torch.allclose(g, g_expected[:4]) and torch.allclose(e, expected[:4])
    assert "computes a different energy" in caplog.text and "eager" in caplog.text
    assert "difference 0 in the energy" in caplog.text  # the gradient alone differed
    assert _COMPILED["default"] is _energy  # eager from then on, checked no more
