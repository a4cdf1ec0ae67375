"""Typed, validated configuration: the one source of defaults.

``params.yaml`` and command lines override these dataclasses through :func:`from_dict`;
the resolved configuration is saved in every checkpoint (:func:`to_dict`).

Defaults are the small CPU setting (digits, 4 -> 8 -> 16). :func:`cifar10_release` gives
the settings of the authors' CIFAR-10 release (METHOD.md, "Training settings").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("swish", "gelu", "elu", "celu", "leaky_relu", "relu")
NOISE_SCHEDULES = ("linear", "constant")
NOISE_SPANS = ("chain", "stage")


class ConfigError(ValueError):
    """An impossible or inconsistent parameter; the message names it."""


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


@dataclass
class ModelConfig:
    """The energy network (METHOD.md, "Energy network")."""

    channels: int = 1
    """Image channels (1 grey, 3 RGB)."""
    resolutions: tuple[int, ...] = (4, 8, 16)
    """r_0 < r_1 < ... < r_S, each twice the previous; one training stage each."""
    base_width: int = 16
    """Feature channels at the finest resolution (CIFAR release: 32)."""
    width_cap: int = 4
    """Channels double toward coarse levels, up to ``width_cap * base_width``."""
    activation: str = "swish"
    """Smooth activations keep the input gradient continuous for Langevin (paper Sec. 3)."""
    spectral_norm: bool = False
    equalized_lr: bool = True

    def __post_init__(self) -> None:
        self.resolutions = tuple(int(r) for r in self.resolutions)
        res = self.resolutions
        if not res:
            raise ConfigError("model.resolutions is empty")
        for r in res:
            if not _is_pow2(r) or r < 4:
                raise ConfigError(f"model.resolutions: {r} is not a power of two >= 4")
        for a, b in zip(res, res[1:]):
            if b != 2 * a:
                raise ConfigError(
                    f"model.resolutions must double at each stage, got {a} then {b} in {res}"
                )
        if self.channels < 1:
            raise ConfigError(f"model.channels must be >= 1, got {self.channels}")
        if self.base_width < 1 or self.width_cap < 1:
            raise ConfigError("model.base_width and model.width_cap must be >= 1")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation {self.activation!r} not in {ACTIVATIONS}")

    @property
    def num_stages(self) -> int:
        return len(self.resolutions)

    def width(self, resolution: int) -> int:
        """Feature channels at ``resolution``: base at the finest, doubling toward coarse."""
        mult = max(1, self.resolutions[-1] // resolution)
        return self.base_width * min(self.width_cap, mult)


@dataclass
class SamplerConfig:
    """Short-run Langevin, coarse to fine (METHOD.md, "Sampling")."""

    steps: int = 30
    """K: Langevin steps per stage (CIFAR release: 15; CelebA/MNIST: 50)."""
    step_size: float = 1.0
    """eta in x <- x - eta * dE/dx + sigma * noise."""
    noise_start: float = 0.015
    noise_end: float = 0.0
    noise_schedule: str = "linear"
    """``linear``: sigma decays from noise_start to noise_end; ``constant``: noise_start."""
    noise_span: str = "chain"
    """Whether the linear decay spans the whole coarse-to-fine ``chain`` or each ``stage``."""
    upsample_noise: float = 0.0
    """Std of Gaussian noise added after each x2 upsampling between stages."""
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"sampler.steps must be >= 1, got {self.steps}")
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ConfigError(f"sampler.step_size must be positive, got {self.step_size}")
        if self.noise_start < 0 or self.noise_end < 0 or self.upsample_noise < 0:
            raise ConfigError("sampler noise scales must be >= 0")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ConfigError(
                f"sampler.noise_schedule {self.noise_schedule!r} not in {NOISE_SCHEDULES}"
            )
        if self.noise_span not in NOISE_SPANS:
            raise ConfigError(f"sampler.noise_span {self.noise_span!r} not in {NOISE_SPANS}")


def _default_batch() -> dict[int, int]:
    # Release: 256 at 8, 128 at 16, 64 at 32 and 64, 32 at 128, 16 at 256+.
    return {4: 256, 8: 256, 16: 128, 32: 64, 64: 64, 128: 32, 256: 16, 512: 16}


@dataclass
class TrainConfig:
    """Optimisation and the fade/stable schedule (METHOD.md, "Training settings")."""

    batch_size: dict[int, int] = field(default_factory=_default_batch)
    """Per resolution; a resolution not listed uses the entry of the nearest coarser one."""
    lr: dict[int, float] = field(default_factory=lambda: {4: 1e-3})
    """Per resolution, same lookup rule as batch_size."""
    adam_betas: tuple[float, float] = (0.5, 0.999)
    fade_images: int = 20_000
    """Training images over which beta ramps 0 -> 1 after an expansion (release: 1.2M)."""
    stable_images: int = 20_000
    """Training images at beta = 1 per stage (release: 1.2M)."""
    energy_penalty: float = 0.0
    """c in loss + c * (E(x_data)^2 + E(x_sample)^2); 0 in the release."""
    data_noise: float = 0.0
    """Std of Gaussian noise added to data (release: 0 on CIFAR, 0.03 on MNIST)."""
    hflip: bool = False
    divergence_threshold: float = 1000.0
    """|loss| or |energy| above this, or any NaN/inf, counts as divergence."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.batch_size = {int(k): int(v) for k, v in dict(self.batch_size).items()}
        self.lr = {int(k): float(v) for k, v in dict(self.lr).items()}
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if not self.batch_size or any(v < 1 for v in self.batch_size.values()):
            raise ConfigError(f"train.batch_size entries must be >= 1: {self.batch_size}")
        if not self.lr or any(not (v > 0) for v in self.lr.values()):
            raise ConfigError(f"train.lr entries must be > 0: {self.lr}")
        if self.fade_images < 0 or self.stable_images < 1:
            raise ConfigError("train.fade_images must be >= 0 and train.stable_images >= 1")
        if not self.divergence_threshold > 0:
            raise ConfigError("train.divergence_threshold must be > 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1): {self.adam_betas}")

    @staticmethod
    def _lookup(table: dict[int, Any], resolution: int, name: str) -> Any:
        keys = sorted(k for k in table if k <= resolution)
        if not keys:
            raise ConfigError(f"train.{name} has no entry at or below resolution {resolution}")
        return table[keys[-1]]

    def batch_for(self, resolution: int) -> int:
        return self._lookup(self.batch_size, resolution, "batch_size")

    def lr_for(self, resolution: int) -> float:
        return self._lookup(self.lr, resolution, "lr")

    def stage_images(self, stage: int) -> int:
        """Images trained at ``stage``: stage 0 has no fade phase."""
        return self.stable_images if stage == 0 else self.fade_images + self.stable_images


@dataclass
class CFEBMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg: Any) -> dict:
    """Plain (YAML/JSON-able) dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` for a mapping from YAML, with errors that name the option at ``where``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown {where} option(s): {', '.join(unknown)}; known: {sorted(names)}"
        )
    try:
        return cls(**data)
    except TypeError as e:  # wrong types that the dataclass could not take
        raise ConfigError(f"{where}: {e}") from e


def from_dict(data: dict | None) -> CFEBMConfig:
    """A validated config from nested dicts ({"model": ..., "sampler": ..., "train": ...})."""
    data = dict(data or {})
    unknown = sorted(set(data) - {"model", "sampler", "train"})
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    return CFEBMConfig(
        model=build_dataclass(ModelConfig, data.get("model"), "model"),
        sampler=build_dataclass(SamplerConfig, data.get("sampler"), "sampler"),
        train=build_dataclass(TrainConfig, data.get("train"), "train"),
    )


def cifar10_release() -> CFEBMConfig:
    """The authors' CIFAR-10 settings: base width 32, spectral norm, Swish, 8 -> 16 -> 32."""
    return CFEBMConfig(
        model=ModelConfig(channels=3, resolutions=(8, 16, 32), base_width=32, spectral_norm=True),
        sampler=SamplerConfig(steps=15, step_size=1.0, noise_start=0.015, noise_end=0.0),
        train=TrainConfig(
            lr={8: 1e-3},
            fade_images=1_200_000,
            stable_images=1_200_000,
            hflip=True,
        ),
    )
