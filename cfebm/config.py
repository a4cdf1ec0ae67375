"""Typed, validated configuration: the one source of defaults.

``params.yaml`` and command lines override these dataclasses; the resolved configuration is
saved in every checkpoint (:func:`to_dict`) and read back with :func:`from_dict`.

Defaults are the small CPU setting (digits, 4 -> 8 -> 16). :func:`cifar10_release` gives
the settings of the authors' CIFAR-10 release (docs/method.md, "Training settings").
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("swish", "gelu", "elu", "celu", "leaky_relu", "relu")
NETWORKS = ("compact", "release")
NOISE_SCHEDULES = ("linear", "constant")
NOISE_SPANS = ("chain", "stage")
PRECISIONS = ("fp32", "bf16", "auto")
COMPILE_MODES = ("eager", "default", "reduce-overhead", "auto")


class ConfigError(ValueError):
    """An impossible or inconsistent parameter; the message names it."""


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


@dataclass
class ModelConfig:
    """The energy network of every stage (paper Sec. 3.1; docs/method.md, "Network")."""

    channels: int | None = None
    """Image channels (1 grey, 3 RGB); null: the training data's (the stages read it from
    the dataset's manifest)."""
    resolutions: tuple[int, ...] = (4, 8, 16)
    """r_0 < r_1 < ... < r_S, each twice the previous; one training stage each."""
    network: str = "compact"
    """``compact``: widths count from the finest resolution (``base_width`` there, doubling
    toward coarse levels up to ``width_cap`` times), for small CPU runs. ``release``: the
    authors' network: widths tied to the absolute resolution (4 x base_width up to 16x16,
    halving at each finer level), spectral norm on the 3x3/4x4 convolutions with PyTorch's
    default initialisation, equalised learning rate on the input, skip and output layers."""
    base_width: int = 16
    """compact: channels at the finest resolution; release: b (CIFAR-10: 32, so 64 channels
    into the 32x32 block and 128 from 16x16 down)."""
    width_cap: int = 4
    """compact: channels double toward coarse levels, up to ``width_cap * base_width``."""
    activation: str = "swish"
    """Smooth activations keep the input gradient continuous for Langevin (paper Sec. 3.3)."""
    spectral_norm: bool = False
    """compact: spectral norm on every layer (release: always on its 3x3/4x4 convs)."""
    equalized_lr: bool = True
    """compact: equalised learning rate on every layer."""

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
        if self.channels is not None and self.channels < 1:
            raise ConfigError(f"model.channels must be >= 1 or null, got {self.channels}")
        if self.base_width < 1 or self.width_cap < 1:
            raise ConfigError("model.base_width and model.width_cap must be >= 1")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation {self.activation!r} not in {ACTIVATIONS}")
        if self.network not in NETWORKS:
            raise ConfigError(f"model.network {self.network!r} not in {NETWORKS}")
        if self.network == "release":
            for r in res:
                if (4 * self.base_width * min(16, r)) % r:
                    raise ConfigError(
                        f"model.network release: base_width {self.base_width} gives no whole "
                        f"channel count at {r}x{r} (4 x base_width x 16 / {r})"
                    )

    @property
    def num_stages(self) -> int:
        return len(self.resolutions)

    def width(self, resolution: int) -> int:
        """Feature channels entering the block at ``resolution`` (and of the head at 4x4)."""
        if self.network == "release":
            return 4 * self.base_width * min(16, resolution) // resolution
        mult = max(1, self.resolutions[-1] // resolution)
        return self.base_width * min(self.width_cap, mult)

    def with_channels(self, channels: int) -> ModelConfig:
        """This config with ``channels`` filled in (an error if it names other channels)."""
        if self.channels is not None and self.channels != channels:
            raise ConfigError(
                f"model.channels is {self.channels} but the data has {channels} channel(s): "
                "set model.channels to null (it then follows the data) or to "
                f"{channels}"
            )
        return dataclasses.replace(self, channels=channels)


@dataclass
class SamplerConfig:
    """Short-run Langevin, coarse to fine (paper Sec. 3.2; docs/method.md, "Sampling")."""

    steps: int = 30
    """K: Langevin steps per stage (CIFAR release: 15; CelebA/MNIST: 50)."""
    stage_steps: list[int] | None = None
    """K of each stage (stage 0 first; the last entry for any further stage), instead of
    ``steps``: with frozen stage energies a fine stage starts from good images and may
    need fewer steps, e.g. [30, 20, 10]. null: ``steps`` everywhere."""
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
    coarse_to_fine: bool = True
    """false: chains start from noise at the sampled stage's own resolution and run
    ``steps * (s + 1)`` steps of E_s alone (no coarse-to-fine sampling: the ablation's
    progressive-growing baseline)."""
    precision: str = "fp32"
    """The energies' arithmetic in the chains: ``fp32``, ``bf16``, or ``auto`` (bf16 where
    the device has bf16 units, fp32 elsewhere; bf16 is never used where it is emulated,
    which is slower than fp32)."""
    compile: str = "eager"
    """``eager``; ``default`` or ``reduce-overhead`` (CUDA graphs): torch.compile's mode
    for the energies; ``auto``: reduce-overhead on a GPU, eager on a CPU."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.stage_steps is not None and (
            not self.stage_steps or any(not isinstance(k, int) or k < 1 for k in self.stage_steps)
        ):
            raise ConfigError(
                f"sampler.stage_steps must be a non-empty list of integers >= 1 or null, got "
                f"{self.stage_steps}"
            )
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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"sampler.precision {self.precision!r} not in {PRECISIONS}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"sampler.compile {self.compile!r} not in {COMPILE_MODES}")

    def k(self, stage: int) -> int:
        """Langevin steps of ``stage`` in the chain."""
        if self.stage_steps:
            return self.stage_steps[min(stage, len(self.stage_steps) - 1)]
        return self.steps

    def chain_steps(self, stage: int) -> int:
        """Steps of a whole chain up to ``stage`` (also the length of the single-resolution
        chain of ``coarse_to_fine: false``)."""
        return sum(self.k(t) for t in range(stage + 1))


def _default_batch() -> dict[int, int]:
    # Release: 256 at 8, 128 at 16, 64 at 32 and 64, 32 at 128, 16 at 256+.
    return {4: 256, 8: 256, 16: 128, 32: 64, 64: 64, 128: 32, 256: 16, 512: 16}


@dataclass
class TrainConfig:
    """Optimisation and the fade/stable schedule (docs/method.md, "Training settings")."""

    batch_size: dict[int, int] = field(default_factory=_default_batch)
    """Per resolution; a resolution not listed uses the entry of the nearest coarser one."""
    lr: dict[int, float] = field(default_factory=lambda: {4: 1e-3})
    """Per resolution, same lookup rule as batch_size."""
    adam_betas: tuple[float, float] = (0.5, 0.999)
    fade_images: int = 20_000
    """Training images over which beta ramps 0 -> 1 after an expansion (release: 1.2M)."""
    stable_images: int = 20_000
    """Training images at beta = 1 after the fade (release: 1.2M)."""
    images: dict[int, int] = field(default_factory=dict)
    """Images trained at the stage of each listed resolution (exact match), fade included;
    a stage not listed trains ``fade_images + stable_images``, as the release trains every
    stage, the first at beta = 1 throughout. List the last resolution with a larger budget
    to keep training it after its fade (the release's long final stage)."""
    energy_penalty: float = 0.0
    """c in loss + c * (E(x_data)^2 + E(x_sample)^2); 0 in the release."""
    data_noise: float = 0.0
    """Std of Gaussian noise added to data (release: 0 on CIFAR, 0.03 on MNIST)."""
    hflip: bool = False
    divergence_threshold: float = 1000.0
    """|loss| or |energy| above this, or any NaN/inf, counts as divergence."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables."""
    replay: dict[int, float] = field(default_factory=dict)
    """Persistent chains (beyond the release; IGEBM, JEM): at each listed resolution this
    share of the negative chains restarts from a buffer of past samples at that resolution
    and runs the stage's K steps; the rest start from noise, coarse to fine. {}: none."""
    replay_buffer: int = 10_000
    """Samples kept in a stage's replay buffer."""
    coarse_bank: int = 0
    """Speed (beyond the release): at a stage s > 0 the negatives' chains take their
    coarse part, the finished stages' Langevin runs up to r_{s-1}, from a bank of this many
    such runs drawn when the stage starts, and run only stage s's K steps per batch. The
    finished energies are frozen, so the bank's samples have exactly the distribution of
    the chains' coarse part (with the same noise schedule); a bank several times smaller
    than the stage's images saves most of the coarse work. 0: every batch runs the whole
    chain, as the paper does."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.batch_size = {int(k): int(v) for k, v in dict(self.batch_size).items()}
        self.lr = {int(k): float(v) for k, v in dict(self.lr).items()}
        self.images = {int(k): int(v) for k, v in dict(self.images).items()}
        self.replay = {int(k): float(v) for k, v in dict(self.replay).items()}
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if not self.batch_size or any(v < 1 for v in self.batch_size.values()):
            raise ConfigError(f"train.batch_size entries must be >= 1: {self.batch_size}")
        if not self.lr or any(not (v > 0) for v in self.lr.values()):
            raise ConfigError(f"train.lr entries must be > 0: {self.lr}")
        if self.fade_images < 0 or self.stable_images < 0:
            raise ConfigError("train.fade_images and train.stable_images must be >= 0")
        if any(v < 1 for v in self.images.values()):
            raise ConfigError(f"train.images entries must be >= 1: {self.images}")
        if any(not 0 <= v <= 1 for v in self.replay.values()):
            raise ConfigError(f"train.replay shares must be in [0, 1]: {self.replay}")
        if self.replay_buffer < 1:
            raise ConfigError("train.replay_buffer must be >= 1")
        if self.coarse_bank < 0:
            raise ConfigError(f"train.coarse_bank must be >= 0, got {self.coarse_bank}")
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

    def images_for(self, resolution: int) -> int:
        """Images trained at the stage of ``resolution`` (see ``images``)."""
        n = self.images.get(resolution, self.fade_images + self.stable_images)
        if n < 1:
            raise ConfigError(f"the stage at {resolution}x{resolution} would train no images")
        return n


SCORE_METRICS = ("fid", "kid")
SCORE_EXTRACTORS = ("domain", "inception-v3-compat")


@dataclass
class ScoreConfig:
    """A score of a model's samples while it trains, lower is better: FID or KID against
    the training data in a named feature space (:mod:`cfebm.metrics`)."""

    metric: str = "fid"
    """fid, or kid (reliable with fewer samples)."""
    extractor: str = "domain"
    """``domain`` (the features stage's CNN, weights ``features``) or
    ``inception-v3-compat`` (weights ``inception_weights``)."""
    features: str = "models/features.pt"
    inception_weights: str | None = None
    num_samples: int = 500
    """Samples per score: the same seeded chains every time (common random numbers)."""
    num_reference: int | None = 2000
    """Training images in the reference (a seeded subset); null: all of them."""
    seed: int = 0
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        if self.metric not in SCORE_METRICS or self.extractor not in SCORE_EXTRACTORS:
            raise ConfigError(
                f"metric {self.metric!r} must be one of {SCORE_METRICS}, extractor "
                f"{self.extractor!r} one of {SCORE_EXTRACTORS}"
            )
        if self.num_samples < 2 or (self.num_reference is not None and self.num_reference < 2):
            raise ConfigError("num_samples and num_reference must be >= 2")
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ConfigError("kid_subsets must be >= 1 and kid_subset_size >= 2")


@dataclass
class Selection(ScoreConfig):
    """The release selects its model by FID: the last stage can be scored every
    ``every_images`` images and keep its best-scoring network as the stage's model."""

    every_images: int = 0
    """Images between scores of the last stage; 0: none (the final network is kept)."""


@dataclass
class CFEBMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg: Any) -> dict:
    """Plain (YAML/JSON-able) dict of a config dataclass."""
    return dataclasses.asdict(cfg)


# --- strict construction from plain data ----------------------------------------------------


def check_types(cls: type, data: Any, where: str) -> None:
    """Raise ConfigError, naming the key, unless ``data`` fits dataclass ``cls`` exactly.

    YAML gives strings where a number or a bool was meant (``"false"``, ``"2"``); those are
    errors here, not silently converted. Unknown keys are errors too. Nested dataclasses,
    ``X | None``, ``Literal``, ``list``/``tuple``/``dict`` annotations are followed.
    """
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {_shown(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    for key, value in data.items():
        _check_value(hints[key], value, f"{where}.{key}")


def _check_value(hint: Any, value: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {_shown(value)}")
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                _check_value(arg, value, where)
                return
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            check_types(hint, value, where)
        return
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_shown(value)}")
        inner = [a for a in args if a is not Ellipsis]
        for i, v in enumerate(value):
            if inner:
                _check_value(inner[min(i, len(inner) - 1)], v, f"{where}[{i}]")
        return
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {_shown(value)}")
        if args:
            for k, v in value.items():
                _check_value(args[0], k, f"{where} key {k!r}")
                _check_value(args[1], v, f"{where}[{k!r}]")
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_shown(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_shown(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_shown(value)}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {_shown(value)}")


def _shown(value: Any) -> str:
    kind = "the string" if isinstance(value, str) else type(value).__name__
    return f"{kind} {value!r}"


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` for plain data, strictly typed (:func:`check_types`), nested
    dataclasses built too; errors name the option at ``where``."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    check_types(cls, data, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        sub = _dataclass_in(hints[key])
        values[key] = (
            build_dataclass(sub, value, f"{where}.{key}") if sub and value is not None else value
        )
    try:
        return cls(**values)
    except ConfigError as e:  # named already, or named here (a class used in several places)
        named = str(e).startswith(where) or f"{where.split('.')[0]}." in str(e)
        raise ConfigError(str(e) if named else f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(data: dict | None) -> CFEBMConfig:
    """A validated config from nested dicts ({"model": ..., "sampler": ..., "train": ...})."""
    return build_dataclass(CFEBMConfig, dict(data or {}), "config")


def cifar10_release() -> CFEBMConfig:
    """The authors' CIFAR-10 settings: the release network (b = 32), Swish, 8 -> 16 -> 32,
    K = 15, batches 256/128/64, lr 1e-3, flips, 1.2M fade + 1.2M stable images a stage."""
    return CFEBMConfig(
        model=ModelConfig(channels=3, resolutions=(8, 16, 32), network="release", base_width=32),
        sampler=SamplerConfig(steps=15, step_size=1.0, noise_start=0.015, noise_end=0.0),
        train=TrainConfig(
            batch_size={8: 256, 16: 128, 32: 64},
            lr={8: 1e-3},
            fade_images=1_200_000,
            stable_images=1_200_000,
            hflip=True,
        ),
    )
