"""One coarse-to-fine stage as a job, wherever it runs: the checks made before any worker
starts, one worker's part (its images, its scorer, its trainer), and the files a finished
stage leaves (model file, pictures, metrics, DVC plots). The Ray Train job and the Ray Tune
trials of ``pipelines`` are adapters over these that add a cluster, reports and MLflow."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from . import io as cio
from .checkpoint import save_checkpoint
from .config import CFEBMConfig, ConfigError, SamplerConfig, ScoreConfig
from .data import PyramidStore
from .data.store import dataset_key, worker_images
from .images import stage_pictures
from .trainer import (
    Trainer,
    check_training_data,
    load_previous_stage,
    model_from_checkpoint,
    per_worker,
    stage_metrics,
    stage_trainer,
)

if TYPE_CHECKING:
    from .evaluate import ScoreHook


def check_stage(
    cfg: CFEBMConfig,
    stage: int,
    data: str,
    storage_options: dict,
    workers: int = 1,
    previous_url: str | None = None,
) -> tuple[CFEBMConfig, dict | None, str]:
    """(``cfg`` with the channels of the pyramid at ``data``, the previous stage's model
    file (at ``previous_url``) or None, a key of what the stage's result depends on): every
    mistake that a check can find, in seconds, before any worker starts."""
    cfg = check_training_data(cfg, PyramidStore(data, storage_options), stage)
    per_worker(cfg, workers)
    inputs = {"dataset": dataset_key(data, storage_options)}
    previous = None
    if stage > 0:
        previous, inputs["previous_model"] = load_previous_stage(previous_url, cfg.model, stage)
    return cfg, previous, cio.content_key({"stage": stage, "config": asdict(cfg), "inputs": inputs})


def score_weights(score: ScoreConfig, where: str) -> bytes | None:
    """The bytes of the domain extractor that scores a stage (``where`` names the setting),
    read once by the driver for workers on any node; None for Inception, whose weights come
    by path or URL. Missing weights are a :class:`ConfigError` naming them."""
    weights = score.features if score.extractor == "domain" else score.inception_weights
    if weights and not cio.exists(weights):
        raise ConfigError(
            f"{where} scores with {score.extractor!r} weights {weights}, which do not exist "
            "yet: run the stage that writes them first (dvc repro features)"
        )
    return cio.read_bytes(weights) if score.extractor == "domain" else None


def stage_worker(
    cfg: CFEBMConfig,
    stage: int,
    store: PyramidStore,
    rank: int = 0,
    world: int = 1,
    *,
    score: ScoreConfig | None = None,
    weights: bytes | None = None,
    previous: dict | None = None,
    state: dict | None = None,
    **kw,
) -> tuple[Trainer, ScoreHook | None, str]:
    """(the trainer of worker ``rank`` of ``world`` for ``stage``: its data shard, resumed
    from ``state`` or warm-started from ``previous``; the ScoreHook of ``score`` against the
    training data, or None; a line saying what data it got). ``weights``: the extractor's
    bytes (:func:`score_weights`); ``kw`` goes to :func:`cfebm.trainer.stage_trainer`."""
    r = cfg.model.resolutions[stage]
    images, how = worker_images(store, r, rank, world)
    scorer = None
    if score is not None:  # (the metrics libraries load only where they are used)
        from .evaluate import score_hook

        local = weights and cio.local_file(weights, ".pt")
        scorer = score_hook(score, store, r, features=local)
    data = {r: torch.from_numpy(images)}
    trainer = stage_trainer(
        per_worker(cfg, world), stage, data, previous, state, world_size=world, rank=rank, **kw
    )
    return trainer, scorer, f"{len(images)} images at {r}x{r}: {how}"


PLOTS = {
    "train": ("loss", "energy_data", "energy_sample"),
    "beta": ("beta",),
    "speed": ("images_per_s",),
}
"""DVC plots of a stage's steps: ``<plots>/<name>/stage<s>.csv`` holds step and these."""


def write_plots(folder: str, stage: int, history: dict) -> None:
    """The stage's curves as DVC plots (:data:`PLOTS`), and its scores (the last stage's
    selection; a header only otherwise) as ``<folder>/scores/stage<s>.csv``."""
    steps, scores = history.get("steps", []), history.get("evaluations", [])
    for name, columns in PLOTS.items():
        cio.write_csv(f"{folder}/{name}/stage{stage}.csv", steps, ["step", *columns])
    columns = ["step", "stage_images", "score", *(scores[-1] if scores else {})]
    cio.write_csv(f"{folder}/scores/stage{stage}.csv", scores, list(dict.fromkeys(columns)))


def write_stage_outputs(
    model_ckpt: dict,
    summary: dict,
    history: dict,
    *,
    model_path: str,
    metrics_path: str,
    plots: str,
    sampler: SamplerConfig,
    count: int,
    seed: int,
) -> tuple[dict, dict[str, bytes]]:
    """Write a finished stage's files: its model file, its metrics JSON, its plots
    (:func:`write_plots`) and its pictures ``<plots>/images/stage<s>/{samples,chain}.png``
    (``count`` samples drawn with ``sampler`` and ``seed``: :func:`cfebm.images.
    stage_pictures`); return (the metrics, the pictures)."""
    stage = int(model_ckpt["stage"])
    save_checkpoint(model_ckpt, model_path)
    pngs = stage_pictures(model_from_checkpoint(model_ckpt), sampler, count, seed)
    for name, png in pngs.items():
        cio.write_bytes(f"{plots}/images/stage{stage}/{name}", png)
    metrics = stage_metrics(model_ckpt, summary)
    cio.write_json(metrics_path, metrics)
    write_plots(plots, stage, history)
    return metrics, pngs


def run_record(summary: dict, clock: dict[str, float], **extra) -> dict:
    """How a stage's run went (``run.json``; its metrics file holds the results): status,
    where it resumed, steps, workers, speed and where its seconds went. ``summary``: the
    loop's (:class:`cfebm.loop.StageSummary` as a dict, with ``world_size``); ``clock``:
    ``time.time()`` at start, checked, placed, fit, fitted and end; ``extra`` is added."""

    def span(a: str, b: str) -> float:
        return round(clock[b] - clock[a], 2)

    return {
        "status": summary.get("status"),
        "resumed_from_step": summary.get("resumed_from_step"),
        "steps_this_run": summary.get("steps_this_attempt"),
        "workers": summary.get("world_size"),
        "images_per_s": summary.get("images_per_s"),
        "fit_seconds": span("fit", "fitted"),
        "wall_seconds": span("start", "end"),
        "timings": {  # seconds
            "checks": span("start", "checked"),
            "ray_start": span("checked", "placed"),
            "workers_and_loop": span("fit", "fitted"),
            "loop": round(summary.get("seconds") or 0.0, 2),
            **(summary.get("timings") or {}),
            "outputs": span("fitted", "end"),
        },
        **extra,
    }
