"""Settings of the training stages: section ``train`` of params.yaml, typed and validated.

The section holds the cfebm configuration (``model``, ``sampler``, ``optim`` -> cfebm's
``CFEBMConfig``) and how a stage runs: Ray (``ray``), checkpoints (``checkpoint``),
divergence handling (``rollback``), MLflow (``mlflow``) and a test hook (``debug``).
Defaults live in these dataclasses and in :mod:`cfebm.config`; params.yaml overrides them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cfebm.config import CFEBMConfig, ConfigError, build_dataclass, from_dict, to_dict
from pipelines.tune_result import apply_tuned_sampler

SECTION = "train"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayParams:
    """Where and how wide a stage runs."""

    address: str | None = None
    """Ray cluster to join; null: ``RAY_ADDRESS`` if set, else start a local Ray."""
    workers: int = 1
    """Data-parallel workers (DDP). The batch sizes in ``optim`` are global: each worker
    takes ``batch_size / workers`` images per step."""
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    """Ray resources of each worker; ``CPU`` also sets its torch threads."""
    placement_strategy: str = "PACK"
    """PACK fills a node first; SPREAD puts workers on different nodes where it can."""
    max_failures: int = 3
    """Times Ray Train restarts the workers from the last checkpoint after a failure."""
    storage: str = "runs/ray"
    """Ray Train run storage (checkpoints): a local folder, or s3://... on a cluster."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``storage`` (e.g. endpoint_url); s3fs also reads AWS_* variables."""
    shared_filesystem: bool = False
    """Declare that local paths are visible on every node (NFS): allows a local ``storage``
    and ``data`` on a multi-node cluster."""
    local_cpus: int | None = None
    """CPUs of a Ray started locally (null: all of this machine's)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"train.ray.workers must be >= 1, got {self.workers}")
        if self.max_failures < -1:
            raise ConfigError("train.ray.max_failures must be >= 0, or -1 for unlimited")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                f"train.ray.placement_strategy {self.placement_strategy!r} not in "
                f"{PLACEMENT_STRATEGIES}"
            )
        self.resources_per_worker = {str(k): float(v) for k, v in self.resources_per_worker.items()}
        if any(v < 0 for v in self.resources_per_worker.values()):
            raise ConfigError(f"train.ray.resources_per_worker: {self.resources_per_worker}")

    @property
    def threads_per_worker(self) -> int:
        return max(1, int(self.resources_per_worker.get("CPU", 1)))


@dataclass
class CheckpointParams:
    every: int = 100
    """Training iterations between checkpoints: a crash loses at most this many."""
    keep: int = 3
    """Checkpoints kept per stage (the newest)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ConfigError("train.checkpoint.every and train.checkpoint.keep must be >= 1")


@dataclass
class RollbackParams:
    """What to do when training diverges (NaN/inf or runaway energies)."""

    max_rollbacks: int = 3
    """Roll back to the last good checkpoint at most this many times per stage, then stop."""
    lr_factor: float = 0.5
    """Multiply the learning rate by this after each rollback (1: keep it)."""
    reseed: bool = True
    """Draw new Langevin noise after a rollback, so the same chains are not replayed."""

    def __post_init__(self) -> None:
        if self.max_rollbacks < 0:
            raise ConfigError("train.rollback.max_rollbacks must be >= 0")
        if not 0 < self.lr_factor <= 1:
            raise ConfigError(f"train.rollback.lr_factor must be in (0, 1], got {self.lr_factor}")


@dataclass
class MlflowParams:
    tracking_uri: str | None = None
    """null: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the project."""
    experiment: str = "cfebm"
    log_every: int = 1
    """Steps between logged metric points (1: every step)."""
    sample_every: int = 200
    """Steps between sample grids logged during a stage (0: only at the end)."""
    num_samples: int = 64
    """Samples in each grid."""

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.sample_every < 0 or self.num_samples < 1:
            raise ConfigError(
                "train.mlflow.log_every and num_samples must be >= 1, sample_every >= 0"
            )


@dataclass
class DebugParams:
    """Test hooks; leave them null in real runs."""

    inject_divergence_at_step: int | None = None
    """TEST HOOK: feed NaN images at this step of the stage, so that the step diverges and
    the rollback path runs (tests/test_train_*.py)."""
    inject_divergence_times: int = 1
    """TEST HOOK: how many times the injection fires (each rollback replays the step)."""


@dataclass
class TrainParams:
    stages: list[dict] = field(default_factory=list)
    """The DVC wiring (dvc.yaml ``foreach``): one ``{stage, after}`` per resolution."""
    data: str = "data/pyramid"
    """The pyramid dataset root (local or any fsspec URL)."""
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    out: str = "models"
    """Stage outputs (DVC outs): ``<out>/stage<s>/model.pt``, ``samples.png``, ``chain.png``."""
    metrics: str = "metrics"
    """Stage metrics for DVC: ``<metrics>/train-stage<s>.json``."""
    progress_every_s: float = 10.0
    """Seconds between progress lines."""
    model: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=dict)
    sampler_from_tune: str | None = None
    """The tune stage's best setting (tune/best.json): its sampler entries override
    ``sampler``; null: train with ``sampler`` as it is."""
    optim: dict = field(default_factory=dict)
    """cfebm's TrainConfig: batch sizes, learning rates, fade/stable images, seed, ..."""
    ray: RayParams = field(default_factory=RayParams)
    checkpoint: CheckpointParams = field(default_factory=CheckpointParams)
    rollback: RollbackParams = field(default_factory=RollbackParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    debug: DebugParams = field(default_factory=DebugParams)

    def __post_init__(self) -> None:
        self.sampler = apply_tuned_sampler(self.sampler, self.sampler_from_tune)
        self.cfebm = from_dict({"model": self.model, "sampler": self.sampler, "train": self.optim})
        n = self.cfebm.model.num_stages
        if self.stages and len(self.stages) != n:
            raise ConfigError(
                f"train.stages lists {len(self.stages)} stage(s) but train.model.resolutions "
                f"{list(self.cfebm.model.resolutions)} has {n}: one DVC stage per resolution"
            )
        for s, item in enumerate(self.stages):
            after = self.data if s == 0 else self.model_path(s - 1)
            if item.get("stage") != s or _norm(item.get("after")) != _norm(after):
                raise ConfigError(
                    f"train.stages[{s}] is {item}; expected {{stage: {s}, after: {after}}} "
                    "(stage 0 runs after the pyramid, stage s after stage s-1's model)"
                )

    def model_path(self, stage: int) -> str:
        return os.path.join(self.out, f"stage{stage}", "model.pt")

    def stage_dir(self, stage: int) -> str:
        return os.path.join(self.out, f"stage{stage}")

    def metrics_path(self, stage: int) -> str:
        return os.path.join(self.metrics, f"train-stage{stage}.json")

    def public(self) -> dict:
        """The resolved settings, as plain data (what --dry-run prints and MLflow logs)."""
        d = dataclasses.asdict(self)
        for key in ("model", "sampler", "optim"):
            d.pop(key)
        d["cfebm"] = to_dict(self.cfebm)
        return d


def _norm(path) -> str:
    path = str(path).rstrip("/")
    return path if "://" in path else os.path.normpath(path)


_NESTED = {
    "ray": RayParams,
    "checkpoint": CheckpointParams,
    "rollback": RollbackParams,
    "mlflow": MlflowParams,
    "debug": DebugParams,
}


def params_from_dict(data: dict | None) -> TrainParams:
    """Validated settings from the ``train`` section (ConfigError names a bad option)."""
    data = dict(data or {})
    for key, cls in _NESTED.items():
        if key in data and not isinstance(data[key], cls):
            data[key] = build_dataclass(cls, data[key], f"train.{key}")
    return build_dataclass(TrainParams, data, "train")


def check_stage(cfg: CFEBMConfig, stage: int) -> None:
    """Raise ConfigError unless ``stage`` is one of the model's stages."""
    if not 0 <= stage < cfg.model.num_stages:
        raise ConfigError(
            f"--stage {stage}: train.model.resolutions {list(cfg.model.resolutions)} has "
            f"stages 0..{cfg.model.num_stages - 1}"
        )


def worker_config(cfg: CFEBMConfig, workers: int) -> CFEBMConfig:
    """The config each of ``workers`` DDP workers runs: global batches split evenly.

    Images per step, and so the beta schedule, are the same for any number of workers.
    """
    if workers == 1:
        return cfg
    d = to_dict(cfg)
    per_worker = {}
    for r, b in cfg.train.batch_size.items():
        if b % workers:
            raise ConfigError(
                f"train.optim.batch_size at {r}x{r} is {b}, which {workers} workers cannot "
                f"split evenly: use a multiple of {workers} (batch sizes are global)"
            )
        per_worker[r] = b // workers
    d["train"]["batch_size"] = per_worker
    return from_dict(d)


def run_key(cfg: CFEBMConfig, stage: int, inputs: dict[str, str]) -> str:
    """A short hash of what a stage's training result depends on.

    The checkpoints of a stage live under a run named after it, so that a re-run with the
    same settings and inputs resumes them while changed settings, data or previous model
    start afresh instead of continuing someone else's optimisation.
    """
    blob = json.dumps(
        {"stage": stage, "config": to_dict(cfg), "inputs": inputs}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
