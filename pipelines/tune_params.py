"""Settings of the ``tune`` stage: section ``tune`` of params.yaml, typed and validated.

The stage searches the Langevin sampler (``step_size``, ``noise_start``, optionally
``steps``) for one coarse-to-fine stage. The network, the base sampler and the optimiser
come from section ``train`` (``model``, ``sampler``, ``optim``): a trial trains exactly
what the training stage would train, with the trial's sampler settings and
``tune.optim`` laid over ``train.optim``. Defaults live in these dataclasses; params.yaml
overrides them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from cfebm.config import (
    CFEBMConfig,
    ConfigError,
    SamplerConfig,
    build_dataclass,
    from_dict,
    to_dict,
)

SECTION = "tune"
METRICS = ("kid", "fid")
EXTRACTORS = ("domain", "inception-v3-compat")
TUNABLE = ("step_size", "noise_start", "steps")
"""The sampler settings a search may change (cfebm SamplerConfig fields)."""


@dataclass
class Dimension:
    """One searched setting: a range ``[low, high]`` (on a log scale with ``log: true``)
    or a list of ``values``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    """Draw uniformly in log(value): the natural scale of step sizes and noise levels."""
    values: list | None = None
    """Explicit candidates instead of a range."""
    grid: bool = False
    """With ``values``: try every value in order (a grid search; ``num_samples`` repeats
    the grid) instead of drawing one at random per trial."""

    def check(self, name: str, integer: bool = False) -> None:
        where = f"tune.space.{name}"
        if self.values is not None:
            if self.low is not None or self.high is not None:
                raise ConfigError(f"{where}: give either values or low/high, not both")
            if not self.values:
                raise ConfigError(f"{where}.values is empty")
            for v in self.values:
                _check_value(where, v, integer)
            return
        if self.grid:
            raise ConfigError(f"{where}.grid needs values")
        if self.low is None or self.high is None:
            raise ConfigError(f"{where}: needs low and high (or values)")
        _check_value(where, self.low, integer)
        _check_value(where, self.high, integer)
        if not self.low < self.high:
            raise ConfigError(f"{where}: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0, got {self.low}")

    def contains(self, value: float) -> bool:
        if self.values is not None:
            return any(math.isclose(value, v, rel_tol=1e-9) for v in self.values)
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.values is not None:
            return f"{'grid' if self.grid else 'choice'} {list(self.values)}"
        return f"{'log' if self.log else 'uniform'}[{self.low:g}, {self.high:g}]"


def _check_value(where: str, v: Any, integer: bool) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}: {v!r} is not a finite number")
    if integer and (int(v) != v or v < 1):
        raise ConfigError(f"{where}: {v!r} is not a positive integer (Langevin steps)")
    if not integer and v < 0:
        raise ConfigError(f"{where}: {v!r} is negative")


@dataclass
class SearchSpace:
    """What the trials vary (null: keep ``train.sampler``'s value)."""

    step_size: Dimension | None = field(
        default_factory=lambda: Dimension(low=0.1, high=10.0, log=True)
    )
    """Langevin step size eta."""
    noise_start: Dimension | None = field(
        default_factory=lambda: Dimension(low=0.003, high=0.05, log=True)
    )
    """Initial Langevin noise sigma (the schedule then decays to ``noise_end``)."""
    steps: Dimension | None = None
    """K, Langevin steps per stage of the chain (integers)."""

    def __post_init__(self) -> None:
        for name in TUNABLE:
            value = getattr(self, name)
            if isinstance(value, dict):
                value = build_dataclass(Dimension, value, f"tune.space.{name}")
                setattr(self, name, value)
            if value is not None:
                value.check(name, integer=name == "steps")
        if not self.dimensions():
            raise ConfigError("tune.space searches nothing: set step_size, noise_start or steps")

    def dimensions(self) -> dict[str, Dimension]:
        return {n: getattr(self, n) for n in TUNABLE if getattr(self, n) is not None}


@dataclass
class AshaParams:
    """Early stopping (asynchronous successive halving, Li et al. 2018)."""

    enabled: bool = True
    """false: every trial trains to the end (FIFO)."""
    grace_steps: int = 20
    """No trial is stopped before this many training steps."""
    reduction_factor: float = 2.0
    """At each rung (grace_steps x factor^k steps) only the best 1/factor of the trials
    that reached it go on."""

    def __post_init__(self) -> None:
        if self.grace_steps < 1 or not self.reduction_factor > 1:
            raise ConfigError("tune.asha: grace_steps must be >= 1 and reduction_factor > 1")


@dataclass
class TuneRayParams:
    address: str | None = None
    """Ray cluster to join; null: ``RAY_ADDRESS`` if set, else start a local Ray."""
    local_cpus: int | None = None
    """CPUs of a Ray started locally (null: all of this machine's)."""
    cpus_per_trial: float = 1.0
    """Ray CPUs of each trial; also its torch threads."""
    max_failures: int = 1
    """Times a failed trial is restarted from its last checkpoint."""
    keep_checkpoints: int | None = None
    """Checkpoints kept per trial; null: all. Keep them all unless disk is short: after a
    kill, Tune's last saved experiment state may name a checkpoint that a limit has
    already deleted, and that trial then cannot resume."""
    reuse_actors: bool = True
    """Run the next trial in a finished trial's process (saves a process start per trial)."""
    state_every_s: float | None = 5.0
    """Seconds between saves of Tune's experiment state, about how much progress an
    interruption loses (TUNE_GLOBAL_CHECKPOINT_S; a save of a small search takes
    milliseconds); null: Ray's default (adaptive, >= 10 s)."""
    verbose: int = 0
    """Ray Tune's own console tables: 0 none (the stage prints a line per score and a
    summary), 1 status updates, 2 every result."""

    def __post_init__(self) -> None:
        if not self.cpus_per_trial > 0 or self.max_failures < 0 or self.verbose not in (0, 1, 2):
            raise ConfigError(
                "tune.ray: cpus_per_trial must be > 0, max_failures >= 0, verbose 0, 1 or 2"
            )
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError("tune.ray.keep_checkpoints must be >= 1 or null")
        if self.state_every_s is not None and self.state_every_s < 0:
            raise ConfigError("tune.ray.state_every_s must be >= 0 or null")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_trial))


@dataclass
class TuneMlflowParams:
    enabled: bool = True
    """Log the search (a nested ``tune`` run of the pipeline run, one nested run per trial)."""
    tracking_uri: str | None = None
    """null: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (as the training stages)."""
    experiment: str = "cfebm"
    log_every: int = 1
    """Training steps between logged loss/energy points of a trial."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ConfigError("tune.mlflow.log_every must be >= 1")


@dataclass
class TuneDebugParams:
    """Test hooks; leave them at their defaults in real runs."""

    report_delay_s: float = 0.0
    """TEST HOOK: seconds a trial waits after each report, so that a test can interrupt the
    search in the middle of a trial (tests/test_tune.py)."""

    def __post_init__(self) -> None:
        if self.report_delay_s < 0:
            raise ConfigError("tune.debug.report_delay_s must be >= 0")


@dataclass
class TuneParams:
    """Settings of the ``tune`` stage (params.yaml section ``tune``)."""

    stage: int = 0
    """The coarse-to-fine stage the trials train (0: the coarsest resolution)."""
    warm_start: str | None = None
    """Stage > 0: the model of stage - 1 that every trial starts from (a cfebm checkpoint)."""
    data: str = "data/pyramid"
    """The pyramid dataset root: training images and the KID/FID reference."""
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    """Reference split for the score (the paper measures against training statistics)."""
    metric: str = "kid"
    """The score ASHA and the choice of the best setting minimise: kid (KID mean, reliable
    with few samples) or fid."""
    extractor: str = "domain"
    """Feature space of the score: ``domain`` (the features stage's CNN) or
    ``inception-v3-compat``."""
    features: str = "models/features.pt"
    """Weights of the domain extractor (pipelines.features output)."""
    inception_weights: str | None = None
    """InceptionV3 weights, path or URL (extractor inception-v3-compat); null: the standard
    download."""
    train_steps: int = 80
    """Training steps of a trial that is not stopped early."""
    eval_every: int = 20
    """Steps between scores (each one a reported result and a trial checkpoint)."""
    eval_samples: int = 256
    """Samples drawn for each score (the same seeded chains for every trial)."""
    num_reference: int | None = 512
    """Reference images for each score (a seeded subset of the split); null: all."""
    kid_subsets: int = 50
    kid_subset_size: int = 256
    """Lowered to the number of samples when there are fewer."""
    num_samples: int = 4
    """Trials (with grid values: repetitions of the grid), the baseline included."""
    max_concurrent_trials: int = 2
    time_budget_s: float | None = 600.0
    """Wall-clock budget of one tuning run: then every trial stops and the best so far wins.
    null: no limit. A resumed run gets the budget again."""
    include_baseline: bool = True
    """Make the first trial the current ``train.sampler`` setting (when inside the space), so
    that the winner is never worse than what training would use anyway."""
    seed: int = 0
    """Seeds the random search and the scoring chains."""
    space: SearchSpace = field(default_factory=SearchSpace)
    asha: AshaParams = field(default_factory=AshaParams)
    optim: dict = field(default_factory=dict)
    """Overrides of ``train.optim`` for the trials (e.g. a shorter fade_images at stage > 0)."""
    storage: str = "runs/tune"
    """Ray Tune experiment storage (trial checkpoints, experiment state): a local folder
    outside DVC's outputs, or s3://... on a cluster."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    shared_filesystem: bool = False
    """Declare that local paths are visible on every node (NFS)."""
    out: str = "tune/best.json"
    """The best setting (DVC out), read by the training stages (train.sampler_from_tune)."""
    metrics: str = "metrics/tune.json"
    """DVC metrics of the search."""
    ray: TuneRayParams = field(default_factory=TuneRayParams)
    mlflow: TuneMlflowParams = field(default_factory=TuneMlflowParams)
    debug: TuneDebugParams = field(default_factory=TuneDebugParams)

    def __post_init__(self) -> None:
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                setattr(self, name, build_dataclass(cls, value, f"tune.{name}"))
        if self.metric not in METRICS:
            raise ConfigError(f"tune.metric {self.metric!r} not in {METRICS}")
        if self.extractor not in EXTRACTORS:
            raise ConfigError(f"tune.extractor {self.extractor!r} not in {EXTRACTORS}")
        for name in ("train_steps", "eval_every", "num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every > self.train_steps:
            raise ConfigError("tune.eval_every must not exceed tune.train_steps")
        if self.eval_samples < 2 or self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ConfigError("tune: eval_samples and kid_subset_size >= 2, kid_subsets >= 1")
        if self.num_reference is not None and self.num_reference < 2:
            raise ConfigError("tune.num_reference must be >= 2 or null")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError("tune.time_budget_s must be > 0 or null")
        if self.stage < 0:
            raise ConfigError(f"tune.stage must be >= 0, got {self.stage}")
        if self.stage > 0 and not self.warm_start:
            raise ConfigError(
                f"tune.stage {self.stage} trains from stage {self.stage - 1}'s model: set "
                "tune.warm_start to its checkpoint (e.g. models/stage0/model.pt)"
            )

    def public(self) -> dict:
        """The resolved settings as plain data (what --dry-run prints and MLflow logs)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


_NESTED = {
    "space": SearchSpace,
    "asha": AshaParams,
    "ray": TuneRayParams,
    "mlflow": TuneMlflowParams,
    "debug": TuneDebugParams,
}


def params_from_dict(data: dict | None) -> TuneParams:
    """Validated settings from the ``tune`` section (ConfigError names a bad option)."""
    return build_dataclass(TuneParams, dict(data or {}), SECTION)


def trial_base_config(p: TuneParams, train_section: dict) -> CFEBMConfig:
    """The cfebm config the trials start from: ``train.model``, ``train.sampler`` and
    ``train.optim`` with ``tune.optim`` over it; the stage must be one of the model's."""
    train_section = train_section or {}
    optim = {**dict(train_section.get("optim") or {}), **p.optim}
    cfg = from_dict(
        {
            "model": train_section.get("model") or {},
            "sampler": train_section.get("sampler") or {},
            "train": optim,
        }
    )
    if p.stage >= cfg.model.num_stages:
        raise ConfigError(
            f"tune.stage {p.stage}: train.model.resolutions {list(cfg.model.resolutions)} has "
            f"stages 0..{cfg.model.num_stages - 1}"
        )
    return cfg


def with_sampler(cfg: CFEBMConfig, overrides: dict) -> CFEBMConfig:
    """``cfg`` with the sampler settings in ``overrides`` (validated by SamplerConfig)."""
    unknown = sorted(set(overrides) - set(TUNABLE))
    if unknown:
        raise ConfigError(f"not tunable sampler setting(s): {unknown}")
    values = {k: (int(v) if k == "steps" else float(v)) for k, v in overrides.items()}
    d = to_dict(cfg)
    d["sampler"] = {**d["sampler"], **values}
    return from_dict(d)


def baseline_point(space: SearchSpace, sampler: SamplerConfig) -> dict | None:
    """The current sampler setting as a search point, or None if it lies outside the space."""
    point = {name: getattr(sampler, name) for name in space.dimensions()}
    inside = all(dim.contains(point[name]) for name, dim in space.dimensions().items())
    return point if inside else None


def experiment_key(p: TuneParams, cfg: CFEBMConfig, inputs: dict[str, str]) -> str:
    """A short hash of everything a search's result depends on.

    The Ray Tune experiment lives under a name built from it: running the stage again with
    the same settings and inputs restores (continues) that experiment, while changed
    settings start a new one instead of mixing trials of different searches.
    """
    d = p.public()
    for key in (
        "storage",
        "storage_options",
        "shared_filesystem",
        "out",
        "metrics",
        "mlflow",
        "debug",
    ):
        d.pop(key)
    d["ray"] = {"cpus_per_trial": p.ray.cpus_per_trial}  # threads change the numbers slightly
    d.pop("data")  # the content counts (inputs), not where it lies
    d.pop("features")
    d.pop("warm_start")
    blob = json.dumps({"tune": d, "config": to_dict(cfg), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
