"""Sample quality of a trained model: FID / KID / precision-recall of each stage's samples
against that stage's data, in a named feature space (:mod:`cfebm.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .config import PRECISIONS, ConfigError, SamplerConfig, ScoreConfig
from .data import PyramidStore
from .loop import Hooks
from .metrics import FID, KID_MEAN, Extractor, MetricsConfig, compute_metrics, metric_key
from .model import CoarseToFineEBM
from .sampling import draw


@dataclass
class EvalConfig:
    """How samples are drawn and measured."""

    num_samples: int = 1000
    """N: samples drawn per stage."""
    sample_batch: int = 250
    """Langevin chains run at once."""
    split: str = "train"
    """Reference split (the paper measures against training-set statistics)."""
    num_reference: int | None = None
    """Reference images drawn from the split (seeded); null: all of them."""
    seed: int = 0
    """Seeds the chains, the reference subset and the KID subsets."""
    precision: str = "auto"
    """The energies' arithmetic while sampling (``sampler.precision``): ``auto`` is bf16
    where the device has bf16 units (on the default run's 16x16 stage it scored FID 2.93
    against fp32's 3.00), fp32 elsewhere."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        if self.num_samples < 2 or self.sample_batch < 1:
            raise ConfigError("evaluate: num_samples must be >= 2 and sample_batch >= 1")
        if self.num_reference is not None and self.num_reference < 2:
            raise ConfigError("evaluate.num_reference must be >= 2 or null")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"evaluate.precision {self.precision!r} not in {PRECISIONS}")


def reference_images(
    store: PyramidStore, split: str, resolution: int, num: int | None, seed: int
) -> np.ndarray:
    """The split's images at ``resolution`` as uint8 (coarse levels are float mean pools,
    rounded like samples are), optionally a seeded subset of ``num``."""
    return np.clip(np.rint(store.subset(split, resolution, num, seed)), 0, 255).astype(np.uint8)


def check_data(model: CoarseToFineEBM, store: PyramidStore, what: str) -> None:
    """ConfigError unless ``store`` has the model's channels and every stage's resolution."""
    if model.cfg.channels != store.channels:
        raise ConfigError(
            f"{what} models {model.cfg.channels}-channel images but {store.url} has "
            f"{store.channels} channel(s)"
        )
    missing = [r for r in model.cfg.resolutions[: model.stage + 1] if r not in store.resolutions]
    if missing:
        raise ConfigError(f"{store.url} has no level at {missing} (it has {store.resolutions})")


def evaluate_stage(
    model: CoarseToFineEBM,
    sampler: SamplerConfig,
    store: PyramidStore,
    extractors: Sequence[Extractor],
    cfg: EvalConfig,
    *,
    stage: int | None = None,
    beta: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, np.ndarray]:
    """(metrics, uint8 samples) of ``stage`` (default: the model's current) against the
    store's level at its resolution, one set of keys per extractor."""
    s = model.stage if stage is None else stage
    r = model.resolution(s)
    samples = draw(
        model,
        replace(sampler, precision=cfg.precision),
        cfg.num_samples,
        batch=cfg.sample_batch,
        seed=cfg.seed,
        stage=s,
        beta=beta,
        progress=progress,
    )
    reference = reference_images(store, cfg.split, r, cfg.num_reference, cfg.seed)
    result: dict = {"resolution": r, "num_samples": len(samples), "num_reference": len(reference)}
    for extractor in extractors:
        result.update(
            compute_metrics(samples, reference, extractor, cfg.metrics, device=model.device)
        )
    return result, samples


def evaluate_model(
    model: CoarseToFineEBM,
    ckpt: dict,
    store: PyramidStore,
    extractors: Sequence[Extractor],
    cfg: EvalConfig,
    sampler: dict | None = None,
    grid: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, bytes]:
    """(the metrics of a model file's last stage, a PNG grid of its first ``grid`` samples),
    sampled as it was trained (its sampler, ``sampler`` overrides laid over it, and the fade
    coefficient of its last stage); :func:`check_data` first."""
    from .images import grid_png
    from .trainer import sampler_of

    settings, beta = sampler_of(ckpt, **(sampler or {}))
    values, samples = evaluate_stage(
        model, settings, store, extractors, cfg, beta=beta, progress=progress
    )
    return values, grid_png(samples[:grid], scale=max(1, 64 // model.resolution()))


class ScoreHook(Hooks):
    """Evaluations for :func:`cfebm.loop.train_stage`: FID/KID of ``num_samples`` samples of
    the current model (seeded: the same chains at every evaluation) against ``reference``
    in ``extractor``'s feature space; ``score`` is ``metric`` (``fid`` or ``kid``). The last
    values and samples stay on the hook for the caller's reports."""

    def __init__(
        self,
        extractor: Extractor,
        reference: np.ndarray,
        *,
        metric: str = "fid",
        num_samples: int = 500,
        seed: int = 0,
        metrics: MetricsConfig | None = None,
    ):
        if metric not in ("fid", "kid"):
            raise ConfigError(f"score metric must be fid or kid, got {metric!r}")
        self.extractor, self.reference, self.seed = extractor, reference, seed
        self.num_samples = num_samples
        self.metrics = metrics or MetricsConfig(fid=metric == "fid", kid=True, prc=False)
        self.key = metric_key(FID if metric == "fid" else KID_MEAN, extractor.label)
        self.values: dict[str, float] = {}
        self.samples: np.ndarray | None = None

    def evaluate(self, trainer) -> dict[str, float]:
        self.samples = draw(
            trainer.model, trainer.cfg.sampler, self.num_samples, seed=self.seed, beta=trainer.beta
        )
        self.values = compute_metrics(
            self.samples, self.reference, self.extractor, self.metrics, device=trainer.model.device
        )
        return {**self.values, "score": self.values[self.key]}


def score_hook(
    cfg: ScoreConfig, store: PyramidStore, resolution: int, features: str | None = None
) -> ScoreHook:
    """The :class:`ScoreHook` that ``cfg`` describes, against ``store``'s training images
    at ``resolution`` (``features``: a local copy of ``cfg.features``, if made)."""
    from .metrics import make_extractor

    extractor = make_extractor(
        cfg.extractor, features=features or cfg.features, inception_weights=cfg.inception_weights
    )
    reference = reference_images(store, "train", resolution, cfg.num_reference, cfg.seed)
    metrics = MetricsConfig(
        fid=cfg.metric == "fid",
        kid=True,
        prc=False,
        seed=cfg.seed,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size,
    )
    return ScoreHook(
        extractor,
        reference,
        metric=cfg.metric,
        num_samples=cfg.num_samples,
        seed=cfg.seed,
        metrics=metrics,
    )
