"""`make bench` plumbing: the Langevin benchmark's equivalence check and its tables.

The smoke preset shrinks the networks to a width of 2 and runs 2 Langevin steps on 2
images: it checks that the benchmark runs and reports what it should, not the speed. Its
main() runs in the test process; the measurements in 9 child interpreters, as in `make bench`.
"""

import pytest
import torch
from fixtures_models import torch_threads

from benchmarks import langevin as bench_langevin
from benchmarks import presets as bench_presets
from benchmarks import run as bench_run
from benchmarks.langevin import (
    BF16_TOLERANCE,
    FP32_TOLERANCE,
    PRESETS,
    EquivalenceError,
    build_model,
    check_equivalence,
    equivalence_rows,
    naive_sample,
    network_config,
    time_langevin,
    time_training,
)
from cfebm.frozen import FrozenEnergy
from cfebm.langevin import energy_and_grad

SMOKE = PRESETS["smoke"]


@pytest.fixture(scope="module")
def cifar_smoke():
    cfg = network_config("cifar10", SMOKE.steps, SMOKE.smoke_width)
    model = build_model(cfg, stage=2, device="cpu").eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    return model, x


def test_fused_fp32_energy_passes_the_check(cifar_smoke):
    model, x = cifar_smoke
    for beta in (1.0, 0.3):
        err_e, err_g = check_equivalence(model, FrozenEnergy(model.nets[2], beta), x, 2, beta)
        assert err_e < FP32_TOLERANCE and err_g < FP32_TOLERANCE


def test_check_raises_on_perturbed_energy(cifar_smoke):
    model, x = cifar_smoke
    fused = FrozenEnergy(model.nets[2])
    with pytest.raises(EquivalenceError, match="energies"):
        check_equivalence(model, lambda y: fused(y) * (1 + 1e-3), x, 2)


def test_check_raises_on_perturbed_gradient_with_equal_energies(cifar_smoke):
    model, x = cifar_smoke
    fused = FrozenEnergy(model.nets[2])
    shift = 1e-2 * energy_and_grad(fused, x)[1].abs().max().item()

    def energy(y):  # same values, input gradient shifted by `shift` everywhere
        return fused(y) + shift * (y - y.detach()).flatten(1).sum(1)

    with pytest.raises(EquivalenceError, match="gradients"):
        check_equivalence(model, energy, x, 2)


def test_check_raises_on_wrong_fade(cifar_smoke):
    model, x = cifar_smoke
    with pytest.raises(EquivalenceError):
        check_equivalence(model, FrozenEnergy(model.nets[2], beta=0.5), x, 2, beta=0.6)


def test_bf16_is_checked_separately_and_fails_the_fp32_tolerance(cifar_smoke):
    model, x = cifar_smoke
    bf16 = FrozenEnergy(model.nets[2], dtype=torch.bfloat16)
    with pytest.raises(EquivalenceError):
        check_equivalence(model, bf16, x, 2)
    check_equivalence(model, bf16, x, 2, tolerance=BF16_TOLERANCE)


def test_default_network_rows_in_process():
    rows = equivalence_rows("default", SMOKE, "cpu")
    assert [(r["stage"], r["beta"]) for r in rows] == [(0, 1), (1, 1), (1, 0.5), (2, 1), (2, 0.5)]
    assert all(max(r["fast-fp32"]) < FP32_TOLERANCE for r in rows)
    rows = time_langevin("default", SMOKE, 0, "cpu", ("naive", "fast-fp32", "fast-bf16"))
    assert all(r["resolution"] == 4 and r["seconds"] > 0 for r in rows.values())
    rows = time_training("default", SMOKE, 1, "cpu")
    assert set(rows) == {"train-naive", "train-fast"}
    assert all(r["resolution"] == 8 and r["seconds"] > 0 for r in rows.values())


def test_naive_sampler_accumulates_parameter_gradients():
    cfg = network_config("default", SMOKE.steps, SMOKE.smoke_width)
    model = build_model(cfg, stage=1, device="cpu").train()
    x = naive_sample(model, 2, cfg.sampler, 1.0, torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1
    grads = [p.grad is not None for name, p in model.current.named_parameters() if "r4" not in name]
    assert grads and all(grads)  # the waste the fused sampler avoids


def test_smoke_run_prints_every_table(capsys):
    # main() here, as `python -m benchmarks.langevin --smoke --network cifar10` runs it: its
    # measurements run in child interpreters of their own (fresh allocators and peaks).
    with torch_threads(torch.get_num_threads()):  # (the preset sets them; restored after)
        report = bench_langevin.main(["--smoke", "--network", "cifar10"])
    out = capsys.readouterr().out
    assert set(report["cpu"]["memory"]["cifar10"]) == {
        "naive", "fast-fp32", "fast-bf16", "train-naive", "train-fast",
    }  # fmt: skip
    assert "Equivalence with the naive path on cpu" in out and "all passed" in out
    for stage, res in enumerate((8, 16, 32)):
        assert f"| cifar10 | {stage} | {res} | 1 |" in out  # equivalence, beta 1
        assert f"| cifar10 | {stage} | {res} | 2 |" in out  # Langevin / training, K = 2
    assert out.count("| cifar10 | 2 | 32 | 2 |") == 2
    for variant in ("naive", "fast-fp32", "fast-bf16", "train-naive", "train-fast"):
        assert f"| cifar10 | {variant} |" in out
    assert "| fast-fp32 vs naive, same allocator |" in out
    assert "Goal >= 5x naive per fp32 Langevin step (cifar10, 32x32)" in out
    # parameters and FLOPs of the release network and the compact one at full size
    assert "| cifar10 | release | 2 | 32 | 1,263,873 |" in out
    assert "| cifar10 | compact | 2 | 32 | 870,689 |" in out


def test_run_skips_a_missing_benchmark(capsys):
    assert bench_run.run_one("benchmarks.not_written_yet") is True
    assert "not present, skipped" in capsys.readouterr().out
    assert bench_run.main(["not_written_yet"]) == 0


def test_preset_costs_are_measured_per_stage_and_extrapolated(capsys):
    # (main() here; each preset is measured in a child interpreter of its own)
    assert bench_presets.main(["--presets", "cifar10-smoke", "--steps", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()]
    rows = [[c.strip() for c in r] for r in rows if r and r[0].strip() == "cifar10-smoke"]
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("0", "8", "32"),
        ("1", "16", "32"),
        ("2", "32", "16"),
    ]
    for r in rows:
        seconds, iterations, hours = float(r[4]), int(r[6].replace(",", "")), float(r[7])
        assert seconds > 0 and hours == pytest.approx(seconds * iterations / 3600, abs=0.01)
    assert [r[5] for r in rows] == ["512", "512", "768"]  # the preset's image budgets
