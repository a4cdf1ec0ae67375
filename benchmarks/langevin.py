"""Benchmark: Langevin sampling and training iterations, fused sampler energy vs naive.

    python -m benchmarks.langevin [--quick | --smoke] [--network all] [--device auto]

For the default network (``ModelConfig()``) and the paper's CIFAR-10 network
(``cifar10_release()``: base width 32, spectral norm, Swish, 8 -> 16 -> 32, K = 15) it
measures, at every stage resolution:

- Langevin throughput (images x steps / s) of a chain of K steps with the stage energy,
  for three variants: ``naive`` (see below), ``fast-fp32`` and ``fast-bf16``
  (:class:`cfebm.frozen.FrozenEnergy`, built once per chain, inside the timing);
- seconds per training iteration (coarse-to-fine chain through all stages <= s, loss,
  Adam step): the trainer's step (finished stages' frozen energies built once, the
  current one per step, :func:`cfebm.trainer.contrastive_step`) against
  :func:`naive_train_step`;
- peak resident memory (VmHWM) of each variant, each run in its own subprocess;
  timings run in one subprocess per network with the variants interleaved (the machine
  is shared: a change of load then hits naive and fast alike);
- the finest CIFAR-10 Langevin step under glibc's default allocator and under the
  thresholds that ``make`` exports, because the allocator moves the naive path a lot.

The naive path is the same mathematics computed the way the authors' release does it:
each stage's :meth:`EnergyNet.forward` in train mode (spectral norm and equalised-lr weights
re-normalised on every call, the 1x1 input conv and every conv then pool at full
resolution), parameters requiring gradients, ``E.sum().backward(retain_graph=True)`` with
parameter gradients accumulating, and the graph kept until the next step's forward.

Before anything is timed, energies and input gradients of the fused energies are compared
with the naive path's (in eval mode, so the spectral-norm power iteration does not move)
on the same inputs at every stage, with and without fade; an fp32 error above
:data:`FP32_TOLERANCE`, or a bf16 one above :data:`BF16_TOLERANCE`, raises
:class:`EquivalenceError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from benchmarks.pyramid import peak_rss_kib
from cfebm.config import CFEBMConfig, SamplerConfig, cifar10_release
from cfebm.flops import energy_grad_flops, loss_step_flops
from cfebm.frozen import FrozenEnergy, stage_energies
from cfebm.langevin import Energy, energy_and_grad, sample_langevin, upsample2x
from cfebm.model import CoarseToFineEBM
from cfebm.objective import contrastive_loss
from cfebm.sampling import sample, uniform_noise
from cfebm.schedules import chain_schedules
from cfebm.trainer import contrastive_step, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNED_MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
"""The allocator setting that the Makefile exports (also used for the main tables here)."""
FP32_TOLERANCE = 1e-4
"""Largest relative max error of fp32 energies / input gradients against the naive path."""
BF16_TOLERANCE = 1e-1
"""Sanity bound for bf16 (measured 4e-3 to 4e-2): beyond it the bf16 path is broken."""
SPEEDUP_GOAL = 5.0
"""Issue #2: fused fp32 >= 5x the naive path per Langevin step at 32x32 on this CPU."""
NETWORKS = ("default", "cifar10")
LANGEVIN_VARIANTS = ("naive", "fast-fp32", "fast-bf16")
ALLOCATOR_VARIANTS = ("naive", "fast-fp32")
TRAIN_VARIANTS = ("train-naive", "train-fast")
DTYPES = {"fast-fp32": torch.float32, "fast-bf16": torch.bfloat16}


class EquivalenceError(AssertionError):
    """A fused energy disagrees with the naive path beyond float tolerance."""


@dataclass(frozen=True)
class Preset:
    """How big a run is: batch, Langevin steps per stage (None: the config's), repeats."""

    batch: int
    steps: int | None
    repeat: int
    train_repeat: int
    smoke_width: int | None = None
    """If set, shrink both networks to this base width (plumbing test, not a benchmark)."""
    threads: int | None = None
    """torch threads; None: every core this process may use."""


PRESETS = {
    "full": Preset(batch=64, steps=None, repeat=5, train_repeat=3),
    "quick": Preset(batch=16, steps=5, repeat=2, train_repeat=1),
    "smoke": Preset(batch=2, steps=2, repeat=1, train_repeat=1, smoke_width=2, threads=1),
}


# --- configurations and models -------------------------------------------------------


def network_config(network: str, steps: int | None, smoke_width: int | None) -> CFEBMConfig:
    """The benchmarked network's config; ``steps`` overrides K, ``smoke_width`` the width."""
    cfg = cifar10_release() if network == "cifar10" else CFEBMConfig()
    if cfg.model.channels is None:  # the default network on the default (grey) digits
        cfg.model = dataclasses.replace(cfg.model, channels=1)
    if steps is not None:
        cfg.sampler = dataclasses.replace(cfg.sampler, steps=steps)
    if smoke_width is not None:
        cfg.model = dataclasses.replace(cfg.model, base_width=smoke_width)
    return cfg


def build_model(cfg: CFEBMConfig, stage: int, device: str, seed: int = 0) -> CoarseToFineEBM:
    """A model grown to ``stage`` (one network per stage) with random (non-zero) biases, so
    that the fused border and skip-bias terms are exercised; timings do not depend on the
    values.
    """
    torch.manual_seed(seed)
    model = CoarseToFineEBM(cfg.model)
    for _ in range(stage):
        model.grow()
    for layer in model.modules():  # settle spectral norm's vectors, as training leaves them
        if getattr(layer, "spectral", False):
            for _ in range(10):
                layer.effective_weight(update=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(device)


# --- the naive path --------------------------------------------------------------------


def naive_energy_and_grad(
    model: CoarseToFineEBM, x: torch.Tensor, stage: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """E(x) [B] (still attached to its graph) and dE/dx, the release's way: module forward,
    ``backward(retain_graph=True)`` into the parameters' ``.grad`` as well as the input's.
    """
    x = x.detach().requires_grad_(True)
    e = model.nets[stage](x, beta=beta)
    e.sum().backward(retain_graph=True)
    return e, x.grad


def naive_langevin(
    model: CoarseToFineEBM,
    x: torch.Tensor,
    stage: int,
    beta: float,
    step_sizes: Sequence[float],
    noise_scales: Sequence[float],
    generator: torch.Generator | None,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
) -> torch.Tensor:
    """The update of :func:`cfebm.langevin.sample_langevin` on the naive energy; each step's
    graph stays alive until the next step's forward has replaced it.
    """
    for eta, sigma in zip(step_sizes, noise_scales):
        # ``e`` keeps this step's graph alive until the next forward rebinds it.
        e, g = naive_energy_and_grad(model, x, stage, beta)
        x = x.detach() - float(eta) * g
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + float(sigma) * noise
        if clamp is not None:
            x = x.clamp(*clamp)
    return x


def naive_sample(
    model: CoarseToFineEBM,
    n: int,
    sampler: SamplerConfig,
    beta: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The coarse-to-fine chain of :func:`cfebm.sampling.sample` with :func:`naive_langevin`."""
    s = model.stage
    device = model.device
    x = uniform_noise(n, model.cfg.channels, model.resolution(0), generator, device)
    steps, noise = chain_schedules(sampler, s + 1)
    clamp = (-1.0, 1.0) if sampler.clamp else None
    for t in range(s + 1):
        if t > 0:
            x = upsample2x(x)
            if sampler.upsample_noise > 0:
                x = x + sampler.upsample_noise * torch.randn(
                    x.shape, generator=generator, device=device
                )
                x = x.clamp(*clamp) if clamp else x
        b = beta if t == s else 1.0
        x = naive_langevin(model, x, t, b, steps[t].tolist(), noise[t].tolist(), generator, clamp)
    return x.detach()


def naive_train_step(
    model: CoarseToFineEBM,
    optimizer: torch.optim.Optimizer,
    x_data: torch.Tensor,
    cfg: CFEBMConfig,
    beta: float,
    generator: torch.Generator,
) -> float:
    """What the trainer's step does, with the naive sampler."""
    n = x_data.shape[0]
    x_sample = naive_sample(model, n, cfg.sampler, beta, generator)
    energies = model.current(torch.cat([x_data, x_sample]), beta=beta)
    loss = contrastive_loss(energies[:n], energies[n:], cfg.train.energy_penalty)
    value = loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.current.parameters(), float("inf"))
    optimizer.step()
    return value


def fast_train_step(
    model: CoarseToFineEBM,
    coarse: list,
    optimizer: torch.optim.Optimizer,
    x_data: torch.Tensor,
    cfg: CFEBMConfig,
    beta: float,
    generator: torch.Generator,
) -> float:
    """The trainer's step: the frozen energies of finished stages (``coarse``) reused, the
    current stage's built for this step, then :func:`cfebm.trainer.contrastive_step`."""
    energies = [*coarse, FrozenEnergy(model.current, beta)]
    x_sample = sample(
        model, len(x_data), cfg.sampler, beta=beta, generator=generator, energies=energies
    )
    return contrastive_step(model.current, optimizer, x_data, x_sample, cfg.train, beta).loss


# --- equivalence -----------------------------------------------------------------------


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (NaN propagates, so it fails checks)."""
    diff = (value.double() - reference.double()).abs().max()
    return float(diff / reference.double().abs().max().clamp_min(1e-30))


def equivalence_errors(
    model: CoarseToFineEBM, energy: Energy, x: torch.Tensor, stage: int, beta: float = 1.0
) -> tuple[float, float]:
    """Relative errors (energy, input gradient) of ``energy`` against the naive path on x,
    the naive path in eval mode so that spectral norm's power iteration leaves ``u`` alone.
    """
    was_training = model.training
    model.eval()
    try:
        e_ref, g_ref = naive_energy_and_grad(model, x, stage, beta)
        e_ref = e_ref.detach()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    e, g = energy_and_grad(energy, x)
    return relative_error(e, e_ref), relative_error(g, g_ref)


def check_equivalence(
    model: CoarseToFineEBM,
    energy: Energy,
    x: torch.Tensor,
    stage: int,
    beta: float = 1.0,
    tolerance: float = FP32_TOLERANCE,
) -> tuple[float, float]:
    """:func:`equivalence_errors`, raising :class:`EquivalenceError` above ``tolerance``."""
    err_e, err_g = equivalence_errors(model, energy, x, stage, beta)
    if not (err_e <= tolerance and err_g <= tolerance):  # also catches NaN
        raise EquivalenceError(
            f"stage {stage} (beta {beta}): relative error of energies {err_e:.3g}, of input "
            f"gradients {err_g:.3g}, against the naive path; tolerance {tolerance:g}"
        )
    return err_e, err_g


def equivalence_rows(network: str, preset: Preset, device: str) -> list[dict]:
    """Check fp32 and bf16 fused energies at every stage (and mid-fade) of ``network``."""
    cfg = network_config(network, preset.steps, preset.smoke_width)
    last = cfg.model.num_stages - 1
    model = build_model(cfg, last, device)
    generator = torch.Generator(device).manual_seed(1)
    rows = []
    for stage in range(last + 1):
        r = cfg.model.resolutions[stage]
        x = uniform_noise(preset.batch, cfg.model.channels, r, generator, device)
        for beta in (1.0,) if stage == 0 else (1.0, 0.5):
            row = {"network": network, "stage": stage, "resolution": r, "beta": beta}
            for name, tol in (("fast-fp32", FP32_TOLERANCE), ("fast-bf16", BF16_TOLERANCE)):
                energy = FrozenEnergy(model.nets[stage], beta, DTYPES[name])
                row[name] = check_equivalence(model, energy, x, stage, beta, tol)
            rows.append(row)
    return rows


# --- timing and memory (child processes) -----------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeat: int, device: str
) -> dict[str, float]:
    """Median wall time of each function over ``repeat`` rounds that call them in turn, so
    that a change in the machine's load (it is shared) hits every variant alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def langevin_chains(
    network: str, preset: Preset, stage: int, device: str, compile: str | None = None
) -> tuple[dict, Callable[[str, int], torch.Tensor]]:
    """(row facts, chain(variant, k)): k Langevin steps from fixed noise at ``stage``'s
    resolution; the fused variants build their :class:`FrozenEnergy` inside the call,
    compiled in torch.compile's mode ``compile`` if given (compiled in the warm-up).
    """
    cfg = network_config(network, preset.steps, preset.smoke_width)
    model = build_model(cfg, cfg.model.num_stages - 1, device).train()
    steps, noise = chain_schedules(cfg.sampler, stage + 1)
    etas, sigmas = steps[stage].tolist(), noise[stage].tolist()
    generator = torch.Generator(device).manual_seed(stage)
    r = cfg.model.resolutions[stage]
    x0 = uniform_noise(preset.batch, cfg.model.channels, r, generator, device)

    flops = energy_grad_flops(FrozenEnergy(model.nets[stage], 1.0), (cfg.model.channels, r, r))

    def chain(variant: str, k: int) -> torch.Tensor:
        if variant == "naive":
            return naive_langevin(model, x0, stage, 1.0, etas[:k], sigmas[:k], generator)
        energy = FrozenEnergy(model.nets[stage], 1.0, DTYPES[variant], compile=compile)
        return sample_langevin(energy, x0, etas[:k], sigmas[:k], generator=generator)

    facts = {"stage": stage, "resolution": r, "steps": len(etas), "flops": flops * preset.batch}
    return facts, chain


def training_steps(
    network: str, preset: Preset, stage: int, device: str
) -> tuple[dict, Callable[[str], None]]:
    """(row facts, step(variant)): one training iteration at ``stage`` (beta = 1, synthetic
    data), each variant with its own copy of the same network and its own Adam.
    """
    cfg = network_config(network, preset.steps, preset.smoke_width)
    models = {v: build_model(cfg, stage, device).train() for v in TRAIN_VARIANTS}
    r = cfg.model.resolutions[stage]
    optimizers = {v: make_optimizer(m.current, cfg.train, r) for v, m in models.items()}
    fast = models["train-fast"]
    coarse = stage_energies(fast, stage - 1) if stage else []
    generator = torch.Generator(device).manual_seed(stage)
    x_data = uniform_noise(preset.batch, cfg.model.channels, r, generator, device)

    def step(variant: str) -> None:
        model, optimizer = models[variant], optimizers[variant]
        if variant == "train-naive":
            naive_train_step(model, optimizer, x_data, cfg, 1.0, generator)
        else:
            fast_train_step(model, coarse, optimizer, x_data, cfg, 1.0, generator)

    c, k = cfg.model.channels, cfg.sampler.steps
    chain = sum(
        energy_grad_flops(FrozenEnergy(fast.nets[t], 1.0), (c, q, q)) * k
        for t, q in enumerate(cfg.model.resolutions[: stage + 1])
    )  # per image: K steps through every stage <= s, then the loss's forward + backward
    flops = (chain + 2 * loss_step_flops(fast.current, (c, r, r))) * preset.batch
    return {"stage": stage, "resolution": r, "steps": k, "flops": flops}, step


def time_langevin(
    network: str,
    preset: Preset,
    stage: int,
    device: str,
    variants: Sequence[str],
    compile: str | None = None,
) -> dict[str, dict]:
    """Seconds per Langevin step of each variant (K-step chains, interleaved medians)."""
    facts, chain = langevin_chains(network, preset, stage, device, compile)
    k = facts["steps"]
    for v in variants:
        chain(v, min(2, k))  # warm-up: oneDNN primitives, allocator, caches
    fns = {v: (lambda v=v: chain(v, k)) for v in variants}
    seconds = interleaved_medians(fns, preset.repeat, device)
    return {v: {**facts, "seconds": seconds[v] / k} for v in variants}


def time_training(network: str, preset: Preset, stage: int, device: str) -> dict[str, dict]:
    """Seconds per training iteration of the naive and the fast step (interleaved medians)."""
    facts, step = training_steps(network, preset, stage, device)
    for v in TRAIN_VARIANTS:
        step(v)  # warm-up
    fns = {v: (lambda v=v: step(v)) for v in TRAIN_VARIANTS}
    seconds = interleaved_medians(fns, preset.train_repeat, device)
    return {v: {**facts, "seconds": seconds[v]} for v in TRAIN_VARIANTS}


def exercise(variant: str, network: str, preset: Preset, stage: int, device: str) -> None:
    """Run ``variant`` once at ``stage``, long enough to reach its peak memory: a few
    Langevin steps (the naive path holds two graphs from the second step on), or one
    training iteration.
    """
    if variant in TRAIN_VARIANTS:
        training_steps(network, preset, stage, device)[1](variant)
    else:
        facts, chain = langevin_chains(network, preset, stage, device)
        chain(variant, min(3, facts["steps"]))


def setup_torch(preset: Preset) -> None:
    """Threads (all cores of this process by default), and fp32 meaning fp32 on CUDA."""
    torch.set_num_threads(preset.threads or cpu_count())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def run_child(args: argparse.Namespace) -> dict:
    """Child process: ``time`` (all variants, interleaved), ``allocator`` (finest stage,
    naive and fast-fp32), ``memory`` (one variant's peak) or ``idle`` (imports + a model).
    """
    preset = resolve_preset(args)
    setup_torch(preset)
    cfg = network_config(args.network, preset.steps, preset.smoke_width)
    stages = range(cfg.model.num_stages)
    out: dict = {"child": args.child, "threads": torch.get_num_threads()}
    if args.child == "time":
        out["langevin"] = [
            time_langevin(args.network, preset, s, args.device, LANGEVIN_VARIANTS, args.compile)
            for s in stages
        ]
        out["train"] = [time_training(args.network, preset, s, args.device) for s in stages]
    elif args.child == "allocator":
        out["langevin"] = [
            time_langevin(args.network, preset, stages[-1], args.device, ALLOCATOR_VARIANTS)
        ]
    elif args.child == "memory":
        for s in stages:
            exercise(args.variant, args.network, preset, s, args.device)
    else:  # idle: the floor under every variant's memory
        build_model(cfg, cfg.model.num_stages - 1, args.device)
    out["peak_mib"] = peak_rss_kib() / 1024
    if args.device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def spawn(
    child: str,
    network: str,
    args: argparse.Namespace,
    device: str,
    variant: str | None = None,
    malloc: str | None = TUNED_MALLOC,
) -> dict:
    """Run a child in a fresh interpreter; ``malloc`` None means glibc's defaults."""
    cmd = [sys.executable, "-m", "benchmarks.langevin", "--child", child]
    cmd += ["--network", network, "--preset", args.preset, "--device", device]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.compile:
        cmd += ["--compile", args.compile]
    if variant:
        cmd += ["--variant", variant]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if malloc:
        env["GLIBC_TUNABLES"] = malloc
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{child} {variant or ''} ({network}, {device}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- machine description ---------------------------------------------------------------


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and its bf16-relevant flags, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
                    flags = [fl for fl in value.split() if fl in wanted]
                    break
    except OSError:
        pass
    return name, flags


FMA_UNITS = 2
"""FMA units per core assumed for the CPU peak (2 on Xeon server cores)."""
GPU_PEAK_TFLOPS = {"H200": (67.0, 989.0), "H100": (67.0, 989.0), "A100": (19.5, 312.0)}
"""(fp32, dense bf16 tensor) TFLOP/s of GPUs by name (the vendors' SXM data sheets)."""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_ghz() -> float | None:
    """The cores' clock: the highest ``cpu MHz`` in /proc/cpuinfo (VMs rarely show the max)."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else None
    except (OSError, ValueError):
        return None


def peak_gflops(device: str) -> tuple[dict[str, float | None], str]:
    """({"fp32": peak, "bf16": peak} in GFLOP/s, how it was computed) for ``device``.

    CPU: cores x FMA width x 2 (an FMA is two FLOPs) x :data:`FMA_UNITS` x clock, with the
    vector width torch uses (``ATEN_CPU_CAPABILITY`` caps it: avx2 = 8 fp32 lanes, AVX-512
    16); bf16 counts the AVX512_BF16 dot product (two bf16 FMAs per fp32 lane) where the CPU
    has it (AMX, where present, can go higher).
    """
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, (fp32, bf16) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return {"fp32": fp32 * 1e3, "bf16": bf16 * 1e3}, f"{name}: data sheet"
        return {"fp32": None, "bf16": None}, f"{name}: peak unknown"
    flags, ghz, cores = cpu_flags(), cpu_ghz(), cpu_count()
    capped = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default")
    lanes = 16 if "avx512f" in flags and not capped else 8 if "avx2" in flags else 4
    if ghz is None:
        return {"fp32": None, "bf16": None}, "clock unknown"
    fp32 = cores * lanes * 2 * FMA_UNITS * ghz
    bf16 = 2 * fp32 if "avx512_bf16" in flags and not capped else None
    how = (
        f"{cores} cores x {lanes} fp32 lanes x 2 FLOP/FMA x {FMA_UNITS} FMA units x {ghz:.2f} GHz"
        f" = {fp32:.0f} GFLOP/s fp32" + (f", {bf16:.0f} bf16 (AVX512_BF16)" if bf16 else "")
    )
    return {"fp32": fp32, "bf16": bf16}, how


def share(gflops: float, peak: float | None) -> str:
    return f"{gflops:,.1f} ({100 * gflops / peak:.0f}%)" if peak else f"{gflops:,.1f}"


def header(preset_name: str, preset: Preset, devices: list[str]) -> str:
    name, flags = cpu_info()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        f"torch {torch.__version__}; CPU {name} ({' '.join(flags) or 'no avx512'}); "
        f"torch.set_num_threads({torch.get_num_threads()}) of {os.cpu_count()} cores; "
        f"load average at start {load}",
        "CUDA: "
        + (
            f"yes, {torch.cuda.get_device_name()} (TF32 off)"
            if "cuda" in devices
            else "not available (CPU only)"
        ),
        f"preset {preset_name}: batch {preset.batch}, "
        f"{'K per config (default 30, CIFAR-10 15)' if preset.steps is None else preset.steps}"
        f" steps per stage, median of {preset.repeat} chains / {preset.train_repeat} "
        f"training iterations after a warm-up; main tables with GLIBC_TUNABLES={TUNED_MALLOC}",
        *(f"peak on {d}: {peak_gflops(d)[1]}" for d in devices),
        "GFLOP/s count useful FLOPs: every energy evaluation and input gradient of the chain"
        " (and the loss step's forward and backward), by torch's FLOP counter (cfebm.flops)",
    ]
    return "\n".join(lines)


# --- tables ----------------------------------------------------------------------------


def equivalence_table(rows: list[dict], device: str) -> str:
    out = [
        f"Equivalence with the naive path on {device} (relative max error; fp32 tolerance "
        f"{FP32_TOLERANCE:g}, bf16 sanity bound {BF16_TOLERANCE:g}): all passed",
        "| network | stage | res | beta | fp32 E | fp32 dE/dx | bf16 E | bf16 dE/dx |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        (f_e, f_g), (b_e, b_g) = r["fast-fp32"], r["fast-bf16"]
        out.append(
            f"| {r['network']} | {r['stage']} | {r['resolution']} | {r['beta']:g} | "
            f"{f_e:.1e} | {f_g:.1e} | {b_e:.1e} | {b_g:.1e} |"
        )
    return "\n".join(out)


def langevin_table(timing: dict[str, dict], batch: int, device: str) -> str:
    peak, _ = peak_gflops(device)
    out = [
        f"Langevin on {device}, batch {batch}: ms per step, images x steps / s, and useful "
        "GFLOP/s (share of the device's peak for that precision; variants interleaved in "
        "one process)",
        "| network | stage | res | K | naive ms | fp32 ms | bf16 ms | naive img*st/s | "
        "fp32 img*st/s | bf16 img*st/s | fp32 vs naive | bf16 vs naive | fp32 GFLOP/s | "
        "bf16 GFLOP/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: |",
    ]
    for network, child in timing.items():
        for rows in child["langevin"]:
            first = rows["naive"]
            ms = [rows[v]["seconds"] * 1e3 for v in LANGEVIN_VARIANTS]
            rate = [batch / rows[v]["seconds"] for v in LANGEVIN_VARIANTS]
            gf = [first["flops"] / rows[v]["seconds"] / 1e9 for v in ("fast-fp32", "fast-bf16")]
            out.append(
                f"| {network} | {first['stage']} | {first['resolution']} | {first['steps']} | "
                + " | ".join(f"{v:.2f}" for v in ms)
                + " | "
                + " | ".join(f"{v:,.0f}" for v in rate)
                + f" | {ms[0] / ms[1]:.2f}x | {ms[0] / ms[2]:.2f}x | "
                + f"{share(gf[0], peak['fp32'])} | {share(gf[1], peak['bf16'])} |"
            )
    return "\n".join(out)


def training_table(timing: dict[str, dict], batch: int, device: str) -> str:
    out = [
        f"Training iteration on {device}, batch {batch} (chain through all stages <= s, "
        "loss, Adam; beta = 1; naive and fast interleaved)",
        "| network | stage | res | K per stage | naive s/it | fast s/it | fast vs naive | "
        "fast GFLOP/s (fp32 peak) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    peak, _ = peak_gflops(device)
    for network, child in timing.items():
        for rows in child["train"]:
            naive, fast = rows["train-naive"], rows["train-fast"]
            gf = fast["flops"] / fast["seconds"] / 1e9
            out.append(
                f"| {network} | {naive['stage']} | {naive['resolution']} | {naive['steps']} | "
                f"{naive['seconds']:.3f} | {fast['seconds']:.3f} | "
                f"{naive['seconds'] / fast['seconds']:.2f}x | {share(gf, peak['fp32'])} |"
            )
    return "\n".join(out)


def memory_table(memory: dict[str, dict], idle: dict, device: str) -> str:
    cuda = device.startswith("cuda")
    out = [
        f"Peak memory on {device} (VmHWM of each variant's own process over all stages: "
        f"3 Langevin steps or 1 training iteration each; imports + one model alone: "
        f"{idle['peak_mib']:.0f} MiB)",
        "| network | variant | peak RSS (MiB) | above idle (MiB) |" + (" CUDA peak (MiB) |" * cuda),
        "| --- | --- | ---: | ---: |" + (" ---: |" * cuda),
    ]
    for network, variants in memory.items():
        for variant, r in variants.items():
            row = (
                f"| {network} | {variant} | {r['peak_mib']:.0f} | "
                f"{r['peak_mib'] - idle['peak_mib']:.0f} |"
            )
            out.append(row + (f" {r.get('cuda_peak_mib', 0):.0f} |" if cuda else ""))
    return "\n".join(out)


def allocator_ms(alloc: dict[str, dict]) -> dict[str, dict[str, float]]:
    """ms per step by variant, then by allocator (``tuned`` / ``default``)."""
    return {
        v: {m: child["langevin"][0][v]["seconds"] * 1e3 for m, child in alloc.items()}
        for v in ALLOCATOR_VARIANTS
    }


def allocator_table(alloc: dict[str, dict], network: str, resolution: int, batch: int) -> str:
    out = [
        f"Allocator: {network} Langevin step at {resolution}x{resolution}, batch {batch}, ms "
        "per step (one process per allocator, naive and fast-fp32 interleaved in each)",
        "| variant | tuned (make) | glibc default | default / tuned |",
        "| --- | ---: | ---: | ---: |",
    ]
    ms = allocator_ms(alloc)
    for variant, t in ms.items():
        out.append(
            f"| {variant} | {t['tuned']:.2f} | {t['default']:.2f} | "
            f"{t['default'] / t['tuned']:.2f}x |"
        )
    n, f = ms["naive"], ms["fast-fp32"]
    out.append(
        f"| fast-fp32 vs naive, same allocator | {n['tuned'] / f['tuned']:.2f}x | "
        f"{n['default'] / f['default']:.2f}x | |"
    )
    return "\n".join(out)


def goal_line(alloc: dict[str, dict], network: str, resolution: int, setting: str) -> str:
    """The issue's goal, judged on the same-allocator ratios; ``setting`` names a run that
    is not the issue's (another preset or batch), whose verdict then means nothing.
    """
    ms = allocator_ms(alloc)
    tuned, default = (ms["naive"][m] / ms["fast-fp32"][m] for m in ("tuned", "default"))
    verdict = "MET" if min(tuned, default) >= SPEEDUP_GOAL else "NOT MET"
    if setting:
        verdict += f" (but {setting} is not the issue's setting)"
    return (
        f"Goal >= {SPEEDUP_GOAL:g}x naive per fp32 Langevin step ({network}, "
        f"{resolution}x{resolution}), same allocator: {tuned:.2f}x with the tuned allocator, "
        f"{default:.2f}x with glibc's default -> {verdict}"
    )


NOTES = """\
Notes:
- naive = EnergyNet.forward in train mode (weights re-normalised every call, conv then
  pool at full resolution), parameter gradients accumulating, backward(retain_graph=True);
  fast = cfebm.frozen.FrozenEnergy + cfebm.langevin.sample_langevin (input gradients only).
- fast training = cfebm.trainer.train_step (fp32 sampler); naive training = the same step
  with the naive chain. Synthetic data; timings do not depend on image values.
- torch.compile of FrozenEnergy (sampler.compile) is measured with --compile MODE (the
  fused rows then run compiled): on the 2-core development CPU it took ~33 s to compile
  one resolution cold and was within ~5% of the eager fused step at 32x32 (fp32, batch
  64), so sampler.compile: auto stays eager on a CPU and uses CUDA graphs on a GPU."""


# --- orchestration ---------------------------------------------------------------------


def run_device(args: argparse.Namespace, preset: Preset, device: str, networks: list[str]):
    """Equivalence check; timings (one process per network, variants interleaved); peak
    memory (one process per variant).
    """
    eq_rows = [row for n in networks for row in equivalence_rows(n, preset, device)]
    print(equivalence_table(eq_rows, device), flush=True)
    timing = {n: spawn("time", n, args, device) for n in networks}
    idle = spawn("idle", networks[0], args, device)
    memory = {
        n: {v: spawn("memory", n, args, device, v) for v in (*LANGEVIN_VARIANTS, *TRAIN_VARIANTS)}
        for n in networks
    }
    return eq_rows, timing, idle, memory


def run_allocator(args: argparse.Namespace, network: str) -> dict[str, dict]:
    """The finest stage's naive and fast-fp32 Langevin step, tuned and default malloc."""
    return {
        name: spawn("allocator", network, args, "cpu", malloc=malloc)
        for name, malloc in (("tuned", TUNED_MALLOC), ("default", None))
    }


def resolve_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    return dataclasses.replace(preset, batch=args.batch) if args.batch else preset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.langevin", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        dest="preset",
        const="quick",
        help="batch 16, 5 steps per stage, 2 repeats (a quick look)",
    )
    size.add_argument(
        "--smoke",
        action="store_const",
        dest="preset",
        const="smoke",
        help="tiny networks and batch: tests the plumbing, not the speed",
    )
    size.add_argument("--preset", choices=tuple(PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--network", choices=(*NETWORKS, "all"), default="all")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CPU, and CUDA too when there is one",
    )
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch")
    p.add_argument(
        "--compile",
        choices=("default", "reduce-overhead"),
        default=None,
        help="the fused energies compiled in this torch.compile mode (sampler.compile)",
    )
    hidden = argparse.SUPPRESS  # child processes only
    p.add_argument("--child", choices=("time", "allocator", "memory", "idle"), help=hidden)
    p.add_argument("--variant", choices=(*LANGEVIN_VARIANTS, *TRAIN_VARIANTS), help=hidden)
    args = p.parse_args(argv)
    args.preset = args.preset or "full"
    return args


def network_table() -> str:
    """Parameters and FLOPs per image of one Langevin step (E and dE/dx of the sampler's
    fused energy, torch's FLOP counter) of each stage's network: the CIFAR-10 setting with
    the release network and with the compact one, and the default digits network."""
    rows = [
        "Networks: parameters of each stage's network and MFLOP per image per Langevin step "
        "(E and dE/dx of the fused energy, counted by torch.utils.flop_counter)",
        "",
        "| setting | network | stage | res | parameters | MFLOP / image / step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    release = cifar10_release().model
    settings = [
        ("cifar10", release),
        ("cifar10", dataclasses.replace(release, network="compact")),
        ("digits", dataclasses.replace(CFEBMConfig().model, channels=1)),
    ]
    for name, cfg in settings:
        model = CoarseToFineEBM(cfg, stage=cfg.num_stages - 1).eval()
        for t, net in enumerate(model.nets):
            r = cfg.resolutions[t]
            flops = energy_grad_flops(FrozenEnergy(net), (cfg.channels, r, r))
            params = sum(p.numel() for p in net.parameters())
            rows.append(f"| {name} | {cfg.network} | {t} | {r} | {params:,} | {flops / 1e6:,.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables, and return the measurements.

    Raises :class:`EquivalenceError` if a fused energy disagrees with the naive path.
    """
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return {}
    start = time.perf_counter()
    preset = resolve_preset(args)
    setup_torch(preset)
    networks = list(NETWORKS) if args.network == "all" else [args.network]
    devices = ["cpu"] if args.device != "cuda" else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append("cuda")
    compiled = f"; fused energies compiled: {args.compile}" if args.compile else ""
    print(f"Langevin / training benchmark ({', '.join(networks)}){compiled}")
    print(header(args.preset, preset, devices), flush=True)
    print(network_table(), flush=True)
    report: dict = {"preset": args.preset, "batch": preset.batch}
    for device in devices:
        eq_rows, timing, idle, memory = run_device(args, preset, device, networks)
        print(langevin_table(timing, preset.batch, device))
        print(training_table(timing, preset.batch, device))
        print(memory_table(memory, idle, device), flush=True)
        report[device] = {"equivalence": eq_rows, "timing": timing, "idle": idle, "memory": memory}
    if "cpu" in devices:
        network = networks[-1]  # the CIFAR-10 network when both run
        alloc = run_allocator(args, network)
        finest = network_config(network, preset.steps, preset.smoke_width).model.resolutions[-1]
        print(allocator_table(alloc, network, finest, preset.batch))
        issue_setting = args.preset == "full" and preset.batch == 64
        setting = "" if issue_setting else f"preset {args.preset}, batch {preset.batch}"
        print(goal_line(alloc, network, finest, setting))
        report["allocator"] = alloc
    print(NOTES)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at end {load}; {time.perf_counter() - start:.0f} s in all", flush=True)
    return report


if __name__ == "__main__":
    main()
