"""DVC stage ``translate``: one-sided unsupervised image-to-image translation.

    python -m pipelines.translate [--params params.yaml] [--source S] [--target T] [...]

Trains the target domain's EBM coarse to fine in this process (cfebm's plain Trainer)
with its Langevin chains started from source-domain images pooled to each stage's
resolution; the translator is that short-run chain (cfebm.translate). Then translates
held-out source images and writes the model checkpoint, a DVC metrics JSON (content kept:
grey-level SSIM and object-mask IoU; colour statistics moved toward the target; FID/KID
against the target when an extractor is configured), grids of source | translation and
saliency heatmaps, and logs them to MLflow. By default the built-in
``shapes`` scenes, domain a (red-ish objects) -> b (blue-ish). Reads section ``translate``
of params.yaml; options override it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cfebm import io as cio
from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import CFEBMConfig, ConfigError, from_dict, to_dict
from cfebm.data import DataError, PyramidStore
from cfebm.features import FeatureError
from cfebm.images import grid_png
from cfebm.sampling import to_uint8
from cfebm.trainer import DivergenceError, StepResult, Trainer
from cfebm.translate import (
    saliency_overlay,
    train_translator,
    translate_with_saliency,
    translation_scores,
)
from pipelines._params import json_mapping, nullable_int, stage_parser
from pipelines._uses import (
    MlflowSettings,
    common_arguments,
    dataclass_fields,
    grid_scale,
    log_to_mlflow,
    merge_sections,
    read_images,
    resolve_section,
    set_threads,
    torch_device,
    write_json,
    write_pngs,
)

SECTION = "translate"


def default_config() -> dict:
    """The translator's cfebm config for 16x16 shapes, about two minutes on two CPU cores."""
    return {
        "model": {"resolutions": [4, 8, 16], "base_width": 16},
        "sampler": {"steps": 10, "step_size": 1.0, "noise_start": 0.015, "noise_end": 0.0},
        "train": {
            "batch_size": {4: 64},
            "lr": {4: 1e-3},
            "fade_images": 6400,
            "stable_images": 12800,
            "seed": 0,
        },
    }


@dataclass
class FidelitySettings:
    """FID/KID of the translations against the target domain (cfebm.metrics)."""

    extractors: list[str] = field(default_factory=list)
    """``domain`` and/or ``inception-v3-compat``; empty: no FID/KID."""
    features: str | None = None
    """Weights of the domain extractor (pipelines.features, trained on the target domain)."""
    inception_weights: str | None = None
    """InceptionV3 weights, path or URL; null: torch-fidelity's standard download."""
    inception_download: bool = False
    metrics: dict = field(default_factory=lambda: {"prc": False})
    """cfebm MetricsConfig keys (fid, kid, prc, kid_subset_size, ...)."""


@dataclass
class TranslateParams:
    """Settings of the ``translate`` stage (params.yaml section ``translate``)."""

    source: str = "data/shapes_a/pyramid"
    """Pyramid root of the source domain."""
    target: str = "data/shapes_b/pyramid"
    """Pyramid root of the target domain (the EBM learns this one)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for source, target and outputs."""
    config: dict = field(default_factory=default_config)
    """cfebm config of the translator (model / sampler / train, cfebm/config.py), merged key
    by key into :func:`default_config`; model channels default to the data's."""
    split: str = "test"
    """Held-out source split that is translated and measured (and the target's reference)."""
    num_images: int | None = 256
    """Held-out images translated (seeded subset); null: all."""
    start_stage: int | None = None
    """Stage whose resolution the translation chain starts at; null: the finest, as the
    translator was trained at its last stage."""
    foreground: bool = True
    """Measure the object-mask IoU (scenes of one object on a background, e.g. shapes)."""
    foreground_min_contrast: float = 0.1
    """Least colour distance to the image's median colour of an object pixel ([-1, 1] units)."""
    model_out: str = "models/translate/model.pt"
    """The translator's checkpoint (DVC output)."""
    checkpoint: str = "runs/translate/last.pt"
    """Periodic checkpoint to resume from after a crash (not a DVC output)."""
    checkpoint_every: int = 100
    """Training steps between periodic checkpoints."""
    resume: bool = True
    """Continue from ``checkpoint`` when it was written for the same config and data."""
    max_rollbacks: int = 3
    """Divergences survived by rolling back to the last checkpoint, then an error."""
    rollback_lr_factor: float = 0.5
    metrics: str = "metrics/translate.json"
    images: str = "outputs/translate"
    """Folder of translation.png and saliency.png."""
    grid_images: int = 16
    seed: int = 0
    """Seeds the held-out subset and the translation chains."""
    progress_every_s: float = 15.0
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    threads: int | None = None
    """torch CPU threads; null: torch's default (all cores)."""
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)

    def __post_init__(self) -> None:
        if isinstance(self.mlflow, dict):
            self.mlflow = MlflowSettings(**self.mlflow)
        if isinstance(self.fidelity, dict):
            self.fidelity = FidelitySettings(**self.fidelity)
        if not isinstance(self.config, dict):
            raise ConfigError("translate.config must be a mapping (model / sampler / train)")
        self.config = merge_sections(default_config(), self.config)
        if self.num_images is not None and self.num_images < 2:
            raise ConfigError("translate.num_images must be >= 2 or null")
        if self.checkpoint_every < 1 or self.grid_images < 1 or self.max_rollbacks < 0:
            raise ConfigError("translate.checkpoint_every and grid_images must be >= 1")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ConfigError("translate.rollback_lr_factor must be in (0, 1]")


FIELDS = dataclass_fields(TranslateParams)


def build_parser() -> argparse.ArgumentParser:
    d = TranslateParams()
    p = stage_parser("pipelines.translate", __doc__)
    p.add_argument("--source", help=f"source-domain pyramid root, path or URL [{d.source}]")
    p.add_argument("--target", help=f"target-domain pyramid root, path or URL [{d.target}]")
    p.add_argument(
        "--storage-options", type=json_mapping, metavar="JSON", help="fsspec options [none]"
    )
    p.add_argument(
        "--config",
        type=json_mapping,
        metavar="JSON",
        help="translator config, merged key by key into the params file's, e.g. "
        '\'{"train": {"stable_images": 2000}}\' '
        f"{json.dumps(default_config())}",
    )
    p.add_argument("--split", help=f"held-out split to translate [{d.split}]")
    p.add_argument(
        "--num-images", type=nullable_int, help=f"images translated; 'none': all [{d.num_images}]"
    )
    p.add_argument(
        "--start-stage",
        type=nullable_int,
        help="stage the translation chain starts at; 'none': the finest [none]",
    )
    p.add_argument(
        "--foreground",
        action=argparse.BooleanOptionalAction,
        help=f"measure the object-mask IoU (one object on a background) [{d.foreground}]",
    )
    p.add_argument(
        "--foreground-min-contrast",
        type=float,
        help="least colour distance of an object pixel to the image's median colour "
        f"[{d.foreground_min_contrast}]",
    )
    p.add_argument("--model-out", help=f"translator checkpoint to write [{d.model_out}]")
    p.add_argument("--checkpoint", help=f"periodic checkpoint for resuming [{d.checkpoint}]")
    p.add_argument(
        "--checkpoint-every", type=int, help=f"steps between checkpoints [{d.checkpoint_every}]"
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        help=f"continue from --checkpoint when it matches config and data [{d.resume}]",
    )
    p.add_argument("--max-rollbacks", type=int, help=f"divergences rolled back [{d.max_rollbacks}]")
    p.add_argument(
        "--rollback-lr-factor",
        type=float,
        help=f"lr factor after a rollback [{d.rollback_lr_factor}]",
    )
    p.add_argument("--metrics", help=f"metrics JSON to write (DVC metrics) [{d.metrics}]")
    p.add_argument("--images", help=f"folder for the PNGs [{d.images}]")
    p.add_argument("--grid-images", type=int, help=f"images per grid row [{d.grid_images}]")
    p.add_argument("--seed", type=int, help=f"seed of subset and chains [{d.seed}]")
    p.add_argument(
        "--progress-every-s",
        type=float,
        help=f"seconds between progress lines [{d.progress_every_s}]",
    )
    p.add_argument(
        "--fidelity",
        type=json_mapping,
        metavar="JSON",
        help='FID/KID settings, e.g. \'{"extractors": ["domain"], "features": "models/'
        f"features_b.pt\"}}' {json.dumps(asdict(FidelitySettings()))}",
    )
    common_arguments(p, d.device)
    return p


def resolve(argv: list[str] | None = None) -> tuple[TranslateParams, argparse.Namespace]:
    """The stage's settings from params.yaml's section, overridden by the command line."""
    values, args = resolve_section(build_parser(), argv, SECTION, FIELDS, {"config", "fidelity"})
    return TranslateParams(**values), args


def translator_config(params: TranslateParams, channels: int) -> CFEBMConfig:
    """The validated cfebm config, model channels from the data unless given."""
    raw = copy.deepcopy(params.config)
    raw.setdefault("model", {}).setdefault("channels", channels)
    cfg = from_dict(raw)
    if cfg.model.channels != channels:
        raise ConfigError(
            f"translate.config.model.channels is {cfg.model.channels} but the data has "
            f"{channels} channels"
        )
    return cfg


def public(params: TranslateParams) -> dict:
    return json.loads(json.dumps(asdict(params), default=str))


# --- the work -----------------------------------------------------------------------------


def open_domains(params: TranslateParams) -> tuple[PyramidStore, PyramidStore]:
    source = PyramidStore(params.source, params.storage_options)
    target = PyramidStore(params.target, params.storage_options)
    if source.channels != target.channels:
        raise ConfigError(
            f"source {params.source} has {source.channels} channels, target {params.target} "
            f"{target.channels}"
        )
    return source, target


def levels(store: PyramidStore, split: str, resolutions) -> dict[int, torch.Tensor]:
    """Every stage resolution's images [N, C, r, r] in the [0, 255] scale, as the Trainer takes."""
    missing = [r for r in resolutions if r not in store.resolutions]
    if missing:
        raise ConfigError(
            f"{store.url} has no level at {missing} (it has {store.resolutions}); build its "
            "pyramid down to the translator's coarsest resolution"
        )
    return {r: torch.from_numpy(np.array(store.read(split, r))) for r in resolutions}


def run_key(cfg: CFEBMConfig, source: PyramidStore, target: PyramidStore) -> str:
    """What a resumable checkpoint must have been trained on: config and both data sets."""
    blob = json.dumps(
        [to_dict(cfg), source.manifest.get("files"), target.manifest.get("files")],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train(
    params: TranslateParams,
    cfg: CFEBMConfig,
    source: PyramidStore,
    target: PyramidStore,
    device: torch.device,
    log=print,
) -> tuple[Trainer, list[tuple[int, dict]]]:
    """Train (or resume) the translator with periodic checkpoints and rollback on divergence;
    returns the trainer and the training curve [(global step, values)]."""
    res = cfg.model.resolutions
    data, src = levels(target, "train", res), levels(source, "train", res)
    key = run_key(cfg, source, target)
    trainer = Trainer(cfg, data, device, source=src)
    if params.resume and cio.exists(params.checkpoint):
        ckpt = load_checkpoint(params.checkpoint, map_location=device)
        if ckpt.get("translate_key") == key:
            trainer.load_state_dict(ckpt)
            log(
                f"translate: resumed from {params.checkpoint} (stage {trainer.state.stage}, "
                f"step {trainer.state.step})"
            )
        else:
            log(f"translate: {params.checkpoint} is from another config or data; starting anew")
    curve: list[tuple[int, dict]] = []
    last = {"t": time.monotonic()}
    good = {"state": copy.deepcopy(trainer.state_dict())}

    def save() -> None:
        state = trainer.state_dict()
        good["state"] = copy.deepcopy(state)
        save_checkpoint({**state, "translate_key": key}, params.checkpoint)

    def on_step(t: Trainer, r: StepResult) -> None:
        curve.append(
            (
                len(curve),
                {"loss": r.loss, "e_data": r.e_data, "e_sample": r.e_sample, "beta": r.beta},
            )
        )
        if t.state.step % params.checkpoint_every == 0:
            save()
        if time.monotonic() - last["t"] >= params.progress_every_s:
            last["t"] = time.monotonic()
            log(
                f"translate: stage {t.state.stage} step {t.state.step} loss {r.loss:.4f} "
                f"E(data) {r.e_data:.3f} E(sample) {r.e_sample:.3f} beta {r.beta:.2f}"
            )

    rollbacks = 0
    while True:
        try:
            train_translator(cfg, data, src, callback=on_step, trainer=trainer)
            break
        except DivergenceError as e:
            rollbacks += 1
            if rollbacks > params.max_rollbacks:
                raise
            log(
                f"translate: {e}; rollback {rollbacks}/{params.max_rollbacks} to the last "
                "checkpoint"
            )
            trainer.load_state_dict(good["state"])
            trainer.after_rollback(params.rollback_lr_factor, seed_offset=rollbacks)
    save()
    return trainer, curve


def fidelity_metrics(
    params: TranslateParams, translations: np.ndarray, reference: np.ndarray, device, log=print
) -> dict[str, float]:
    """FID/KID of the translations against target images, with each configured extractor."""
    f = params.fidelity
    if not f.extractors:
        return {}
    try:
        from cfebm import metrics as cm
    except ImportError as e:  # the metrics module needs torch-fidelity
        raise ConfigError(f"translate.fidelity needs cfebm.metrics ({e})") from e
    cfg = cm.MetricsConfig(**{**f.metrics, "seed": params.seed})
    out: dict[str, float] = {}
    for name in f.extractors:
        try:
            if name == cm.INCEPTION:
                ex = cm.inception_extractor(f.inception_weights, download=f.inception_download)
            elif name == cm.DOMAIN:
                if not f.features:
                    raise ConfigError("translate.fidelity: extractor 'domain' needs 'features'")
                ex = cm.domain_extractor(f.features)
            else:
                raise ConfigError(
                    f"translate.fidelity.extractors: {name!r} is not {cm.DOMAIN!r} or "
                    f"{cm.INCEPTION!r}"
                )
        except (cm.InceptionWeightsError, FeatureError) as e:
            raise ConfigError(f"translate.fidelity: {e}") from e
        values = cm.compute_metrics(translations, reference, ex, cfg, device=device)
        log("translate: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        out.update(values)
    return out


def evaluate(
    params: TranslateParams,
    model,
    cfg: CFEBMConfig,
    source: PyramidStore,
    target: PyramidStore,
    device: torch.device,
    log=print,
) -> tuple[dict, dict[str, bytes]]:
    """Translate held-out source images; (metrics, PNGs)."""
    r = model.resolution()
    xs = read_images(source, params.split, r, params.num_images, params.seed).to(device)
    xt = read_images(target, params.split, r, params.num_images, params.seed + 1).to(device)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    y, maps = translate_with_saliency(
        model, xs, cfg.sampler, start_stage=params.start_stage, generator=gen
    )
    scores = translation_scores(
        xs, y, xt, foreground=params.foreground, min_contrast=params.foreground_min_contrast
    )
    change = (y - xs).abs().sum(1).flatten()
    metrics = {
        "resolution": r,
        "num_images": len(xs),
        **scores.as_dict(),
        "saliency_corr_change": float(
            torch.corrcoef(torch.stack([maps["change"].flatten(), change]))[0, 1]
        ),
        "saliency_corr_gradient": float(
            torch.corrcoef(torch.stack([maps["gradient"].flatten(), change]))[0, 1]
        ),
    }
    metrics.update(
        fidelity_metrics(params, to_uint8(y).cpu().numpy(), to_uint8(xt).cpu().numpy(), device, log)
    )
    n = min(params.grid_images, len(xs))
    scale = grid_scale(r)
    pair = torch.cat([xs[:n], y[:n]])
    overlays = [saliency_overlay(xs[:n], maps[k][:n]) for k in ("change", "gradient")]
    sal = torch.cat([pair.expand(-1, 3, -1, -1), *overlays])  # overlays are RGB
    pngs = {
        "translation.png": grid_png(to_uint8(pair).cpu().numpy(), nrow=n, scale=scale),
        "saliency.png": grid_png(to_uint8(sal).cpu().numpy(), nrow=n, scale=scale),
    }
    return metrics, pngs


def run(params: TranslateParams, log=print) -> dict:
    set_threads(params.threads)
    device = torch_device(params.device)
    source, target = open_domains(params)
    cfg = translator_config(params, target.channels)
    t0 = time.monotonic()
    trainer, curve = train(params, cfg, source, target, device, log)
    seconds = time.monotonic() - t0
    save_checkpoint(trainer.state_dict(), params.model_out)
    model = trainer.model.eval()
    log(f"translate: trained in {seconds:.0f} s; wrote {params.model_out}")
    metrics, pngs = evaluate(params, model, cfg, source, target, device, log)
    metrics["train_seconds"] = round(seconds, 1)
    metrics["train_steps"] = len(curve)
    log(
        "translate: "
        + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    )
    write_json(params.metrics, metrics)
    write_pngs(params.images, pngs)
    if params.mlflow.enabled:
        run_id = log_to_mlflow(params.mlflow, SECTION, public(params), metrics, pngs, curve=curve)
        log(f"translate: logged to MLflow run {run_id}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    try:
        params, args = resolve(argv)
        if args.dry_run:
            print(json.dumps(public(params), indent=2))
            return
        run(params)
    except (ConfigError, DataError, DivergenceError, FileNotFoundError, ValueError) as e:
        sys.exit(f"translate: error: {e}")
    print(f"translate: wrote {params.model_out}, {params.metrics} and {params.images}/")


if __name__ == "__main__":
    main()
