"""What the device computes fast: the precision and compilation of the Langevin energies.

bfloat16 halves the bytes and, on hardware with bf16 units, doubles the dot-product rate;
without them it is emulated and several times slower than fp32 (measured with ``make
bench``: 5.5x the naive fp32 energy on a CPU with AVX512_BF16, 0.16x on an AVX2-only one).
So ``auto`` (and ``bf16``) use it only where it is native: a CUDA device of compute
capability 8.0 or later, or a CPU running oneDNN at an AVX-512 level with AVX512_BF16 or
AMX units (``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` caps are honoured).
"""

from __future__ import annotations

import logging

import torch

from .config import COMPILE_MODES, PRECISIONS, ConfigError, SamplerConfig

log = logging.getLogger(__name__)


def resolve(name: str, threads: int | None = None) -> torch.device:
    """The torch device ``name``; ``auto``: cuda when available, else cpu. ``threads``: the
    number of torch's CPU threads to set (None: leave torch's default, all cores)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {threads}")
        torch.set_num_threads(threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` has bf16 arithmetic units that its kernels use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return (
        torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # (honours ONEDNN_MAX_CPU_ISA)
        and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    )


def sampling_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype of the frozen energies for ``precision`` (``fp32``, ``bf16``, ``auto``) on
    ``device``: bf16 only where it is native, since emulated bf16 is slower than fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {PRECISIONS}")
    if precision == "fp32":
        return torch.float32
    if native_bf16(device):
        return torch.bfloat16
    if precision == "bf16":
        log.warning("precision bf16: %s has no bf16 units (emulated bf16 is slower): fp32", device)
    return torch.float32


def compile_mode(setting: str, device: str | torch.device) -> str | None:
    """torch.compile's mode for the energies, or None for eager: ``auto`` compiles with CUDA
    graphs (``reduce-overhead``) on a GPU, where the small coarse stages are bound by kernel
    launches, and stays eager on a CPU, where the convolutions dominate."""
    if setting not in COMPILE_MODES:
        raise ValueError(f"compile {setting!r} not in {COMPILE_MODES}")
    if setting == "auto":
        return "reduce-overhead" if torch.device(device).type == "cuda" else None
    return None if setting == "eager" else setting


def energy_options(sampler: SamplerConfig, device: str | torch.device) -> dict:
    """The :class:`cfebm.frozen.FrozenEnergy` options (dtype, compile) that ``sampler``'s
    precision and compile settings give on ``device``."""
    return {
        "dtype": sampling_dtype(sampler.precision, device),
        "compile": compile_mode(sampler.compile, device),
    }
