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

from cfebm import io as cio
from cfebm.checkpoint import save_checkpoint
from cfebm.config import CFEBMConfig, ConfigError, ModelConfig, SamplerConfig, TrainConfig
from cfebm.data import PyramidStore, training_images
from cfebm.loop import FileCheckpoints, LoopConfig, resume_from_file
from cfebm.trainer import Trainer
from cfebm.translate import TranslationConfig, train_translator, translation_study
from pipelines import _cli, models, tracking


@dataclass
class TranslateStage(TranslationConfig, models.Runtime):
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
    model_out: str = "models/translate/model.pt"
    """The translator's model file (DVC output)."""
    checkpoint: str = "runs/translate/last.pt"
    """Periodic checkpoint to resume from after a crash (not a DVC output)."""
    metrics: str = "metrics/translate.json"
    images: str = "outputs/translate"
    """Folder of translation.png and saliency.png."""


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
    metrics, pngs = translation_study(model, source, target, cfg.sampler, p, device, log)
    curve = [(row.pop("step"), row) for row in copy.deepcopy(trainer.history["steps"])]
    metrics["train_steps"] = len(curve)
    log(
        "translate: "
        + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    )
    cio.write_results(p.metrics, metrics, p.images, pngs)
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
