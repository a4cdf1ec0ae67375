"""DVC stage ``translate``: one-sided unsupervised image-to-image translation.

    python -m pipelines.translate [--params params.yaml] [--source S] [--target T] ...

Trains the target domain's EBM coarse to fine in this process (cfebm's training loop) with
its Langevin chains started from source-domain images pooled to each stage's resolution;
the translator is that short-run chain (cfebm.translate). Then translates held-out source
images and writes the model, a DVC metrics JSON (content kept: grey-level SSIM and
object-mask IoU; colour statistics moved toward the target; FID/KID against the target
when an extractor is configured), grids of source | translation and saliency heatmaps, and
logs them to MLflow. By default the built-in ``shapes`` scenes, domain a (red-ish objects)
-> b (blue-ish).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cfebm import io as cio
from cfebm.checkpoint import save_checkpoint
from cfebm.config import CFEBMConfig, ConfigError, ModelConfig, SamplerConfig, TrainConfig
from cfebm.data import PyramidStore, to_unit_range, training_images
from cfebm.loop import FileCheckpoints, LoopConfig, resume_from_file
from cfebm.metrics import Extractors, MetricsConfig, compute_metrics
from cfebm.sampling import to_uint8
from cfebm.trainer import Trainer
from cfebm.translate import evaluate_translation, train_translator, translation_pictures
from pipelines import _cli, models, tracking


@dataclass
class Fidelity(Extractors):
    """FID/KID of the translations against the target domain (cfebm.metrics); the domain
    extractor's ``features`` are trained on the target domain."""

    extractors: list[str] = field(default_factory=list)
    """``domain`` and/or ``inception-v3-compat``; empty: no FID/KID."""
    features: str | None = None
    inception_download: bool = False
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(prc=False))


@dataclass
class TranslateStage(models.Runtime):
    """One-sided translation source -> target (params.yaml section ``translate``)."""

    source: str = "data/shapes_a/pyramid"
    """Pyramid root of the source domain."""
    target: str = "data/shapes_b/pyramid"
    """Pyramid root of the target domain (the EBM learns this one)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(resolutions=(4, 8, 16)))
    """The translator's network; channels follow the data."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=10))
    optim: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size={4: 64}, fade_images=6400, stable_images=12800
        )
    )
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Checkpoint cadence (of ``checkpoint``), rollbacks, progress lines."""
    split: str = "test"
    """Held-out source split that is translated (and the target's reference split)."""
    num_images: int | None = 256
    """Held-out images translated (seeded subset); null: all."""
    start_stage: int | None = None
    """Stage whose resolution the translation chain starts at; null: the finest."""
    foreground: bool = True
    """Measure the object-mask IoU (scenes of one object on a background, e.g. shapes)."""
    foreground_min_contrast: float = 0.1
    model_out: str = "models/translate/model.pt"
    """The translator's model file (DVC output)."""
    checkpoint: str = "runs/translate/last.pt"
    """Periodic checkpoint to resume from after a crash (not a DVC output)."""
    metrics: str = "metrics/translate.json"
    images: str = "outputs/translate"
    """Folder of translation.png and saliency.png."""
    grid_images: int = 16
    seed: int = 0
    """Seeds the held-out subset and the translation chains."""
    fidelity: Fidelity = field(default_factory=Fidelity)


def fidelity_metrics(
    f: Fidelity, translations: np.ndarray, reference: np.ndarray, device, log=print
) -> dict:
    """FID/KID of the translations against target images, with each configured extractor."""
    try:
        extractors = f.make()
    except ValueError as e:  # missing or unknown weights (FeatureError, InceptionWeightsError)
        raise ConfigError(f"translate.fidelity: {e}") from e
    out: dict[str, float] = {}
    for ex in extractors:
        values = compute_metrics(translations, reference, ex, f.metrics, device=device)
        log("translate: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        out.update(values)
    return out


def run(p: TranslateStage, log=print) -> dict:
    device = p.setup()
    source = PyramidStore(p.source, p.storage_options)
    target = PyramidStore(p.target, p.storage_options)
    if source.channels != target.channels:
        raise ConfigError(
            f"source {p.source} has {source.channels} channels, target {p.target} {target.channels}"
        )
    cfg = CFEBMConfig(p.model.with_channels(target.channels), p.sampler, p.optim)
    res = cfg.model.resolutions
    data, src = training_images(target, res), training_images(source, res)
    files = [source.manifest.get("files"), target.manifest.get("files")]
    key = cio.content_key([dataclasses.asdict(cfg), *files], 16)
    trainer = Trainer(cfg, data, device, source=src)
    resumed = resume_from_file(trainer, p.checkpoint, key)
    if resumed:
        at = f"stage {trainer.state.stage}, step {trainer.state.step}"
        log(f"translate: resumed from {p.checkpoint} ({at})")
    hooks = FileCheckpoints(p.checkpoint, key, lambda line: log(f"translate: {line}"))
    t0 = time.monotonic()
    train_translator(cfg, data, src, loop=p.loop, hooks=[hooks], trainer=trainer, resumed=resumed)
    seconds = time.monotonic() - t0
    save_checkpoint(trainer.model_state(), p.model_out)
    model = trainer.model.eval()
    log(f"translate: trained in {seconds:.0f} s; wrote {p.model_out}")
    r = model.resolution()
    xs = to_unit_range(source.subset(p.split, r, p.num_images, p.seed)).to(device)
    xt = to_unit_range(target.subset(p.split, r, p.num_images, p.seed + 1)).to(device)
    metrics, y, maps = evaluate_translation(
        model,
        xs,
        xt,
        cfg.sampler,
        start_stage=p.start_stage,
        foreground=p.foreground,
        min_contrast=p.foreground_min_contrast,
        seed=p.seed,
    )
    metrics.update(
        fidelity_metrics(
            p.fidelity, to_uint8(y).cpu().numpy(), to_uint8(xt).cpu().numpy(), device, log
        )
    )
    curve = [(row.pop("step"), row) for row in copy.deepcopy(trainer.history["steps"])]
    metrics["train_steps"] = len(curve)
    log(
        "translate: "
        + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    )
    n, scale = min(p.grid_images, len(xs)), max(1, 64 // r)
    pngs = translation_pictures(xs, y, maps, n, scale)
    _cli.write_results(p.metrics, metrics, p.images, pngs)
    logged = {**metrics, "train_seconds": round(seconds, 1)}  # timings: MLflow, not DVC
    tracking.log_stage("translate", p, logged, pngs, curve=curve, log=log)
    return metrics


main = _cli.stage_main(
    TranslateStage,
    "translate",
    lambda p, _: run(p),
    __doc__,
    lambda p, _: f"wrote {p.model_out}, {p.metrics} and {p.images}/",
)


if __name__ == "__main__":
    _cli.script(main)
