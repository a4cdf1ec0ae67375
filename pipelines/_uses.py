"""What the stages of the energy's uses (restore, ood, translate) share: reading a model and
images, writing metrics and pictures, resolving params, and logging to MLflow.

MLflow is imported only when a stage logs to it; cfebm never is asked to.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from cfebm import io as cio
from cfebm.checkpoint import load_checkpoint
from cfebm.config import ConfigError
from cfebm.data import PyramidStore, to_unit_range
from cfebm.model import EnergyNet
from cfebm.trainer import model_from_checkpoint
from pipelines._params import load_section, nullable_int, overrides


@dataclass
class MlflowSettings:
    enabled: bool = True
    """Log metrics, pictures and settings to MLflow (a nested run of the pipeline run)."""
    tracking_uri: str | None = None
    """null: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (as the training stages)."""
    experiment: str = "cfebm"


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process (None: torch's default, all cores)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {threads}")
        torch.set_num_threads(threads)


def torch_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(url: str, device: torch.device, stage: int | None) -> tuple[EnergyNet, dict]:
    """The trained network of the checkpoint at ``url`` and the checkpoint; ``stage`` must be
    one it has grown."""
    ckpt = load_checkpoint(url, map_location=device)
    model = model_from_checkpoint(ckpt, device)
    if stage is not None and not 0 <= stage <= model.stage:
        raise ConfigError(f"stage {stage}: {url} has stages 0..{model.stage}")
    return model, ckpt


def read_images(
    store: PyramidStore, split: str, resolution: int, num: int | None, seed: int
) -> torch.Tensor:
    """Float images [n, C, r, r] in [-1, 1] of ``split`` at ``resolution``: all of them, or a
    seeded subset of ``num`` (in dataset order)."""
    if resolution not in store.resolutions:
        raise ConfigError(f"{store.url} has no level at resolution {resolution}")
    images = store.read(split, resolution)
    if num is not None and num < len(images):
        idx = np.sort(np.random.default_rng(seed).choice(len(images), num, replace=False))
        images = images[idx]
    return to_unit_range(images)


def check_channels(model: EnergyNet, store: PyramidStore, what: str) -> None:
    if model.cfg.channels != store.channels:
        raise ConfigError(
            f"{what} models {model.cfg.channels}-channel images but {store.url} has "
            f"{store.channels} channels"
        )


def write_json(url: str, values: Mapping) -> None:
    cio.write_bytes(url, (json.dumps(values, indent=2) + "\n").encode())


def write_pngs(folder: str, pngs: Mapping[str, bytes]) -> None:
    for name, data in pngs.items():
        cio.write_bytes(cio.join(folder, name), data)


def grid_scale(resolution: int) -> int:
    """PNG enlargement so that one image is at least 64 pixels wide."""
    return max(1, 64 // resolution)


def flat_metrics(values: Mapping, prefix: str = "") -> dict[str, float]:
    """Nested numbers -> {"a/b": 1.0}: DVC's nested keys as MLflow metric names."""
    out: dict[str, float] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_metrics(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def resolve_section(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    section_name: str,
    known: set[str],
    nested: set[str] = frozenset(),
) -> tuple[dict, argparse.Namespace]:
    """Section ``section_name`` of the params file overridden by the command line.

    ``known`` are the section's keys (anything else is an error naming it); ``nested`` are
    mapping-valued keys whose command-line JSON is merged into the file's mapping.
    """
    args = parser.parse_args(argv)
    section = dict(
        load_section(args.params or "params.yaml", section_name, required=bool(args.params))
    )
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown {section_name} parameter(s) {unknown}; known: {sorted(known)}")
    cli = overrides(args, known - {"mlflow"})
    for key in nested & set(cli):
        cli[key] = merge_sections(dict(section.get(key) or {}), cli[key])
    values = {**section, **cli}
    if getattr(args, "mlflow", None) is not None:
        values["mlflow"] = {**dict(section.get("mlflow") or {}), "enabled": args.mlflow}
    return values, args


def merge_sections(base: Mapping, update: Mapping) -> dict:
    """``update`` merged into ``base`` two levels deep: top-level mappings (e.g. a config's
    ``model`` / ``sampler`` / ``train``) key by key, anything below replaced whole (so a
    per-resolution table given in ``update`` replaces the one in ``base``)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **copy.deepcopy(dict(value))}
        else:
            out[key] = copy.deepcopy(value)
    return out


def common_arguments(parser: argparse.ArgumentParser, device: str) -> None:
    """--device, --threads and --mlflow, the same in every stage of the uses."""
    parser.add_argument("--device", help=f"cpu, cuda, cuda:1, or auto [{device}]")
    parser.add_argument(
        "--threads",
        type=nullable_int,
        help="torch CPU threads; 'none': torch's default (all cores) [none]",
    )
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        help="log metrics, pictures and settings to MLflow [True]",
    )


def dataclass_fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def log_to_mlflow(
    settings: MlflowSettings,
    stage: str,
    params: Mapping[str, Any],
    metrics: Mapping,
    pngs: Mapping[str, bytes],
    texts: Mapping[str, str] | None = None,
    curve: list[tuple[int, Mapping[str, float]]] | None = None,
) -> str:
    """Log a stage's settings, metrics (flattened), PNGs and an optional training ``curve``
    [(step, values)] (as ``train/<name>``) as a nested run ``stage`` of the pipeline run
    (pipelines.tracking); returns its run id. A parent run created just for this stage
    (none was running) is ended with it."""
    from pipelines import tracking  # MLflow only when asked for

    uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    runs = tracking.PipelineRuns(uri, settings.experiment)
    parent = runs.parent()
    children = runs.client.search_runs(
        [runs.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1
    )
    run_id, _ = runs.stage(
        parent, stage, stage, tracking.flatten(dict(params)), {"cfebm.stage": stage}
    )
    logger = tracking.RunLogger(uri, run_id)
    for step, values in curve or ():
        logger.metrics(step, {f"train/{k}": v for k, v in values.items()})
    logger.metrics(0, flat_metrics(metrics))
    logger.flush()
    for name, data in pngs.items():
        logger.png(data, f"{stage}/{name}")
    logger.text(json.dumps(metrics, indent=2), f"{stage}/metrics.json")
    for name, text in (texts or {}).items():
        logger.text(text, f"{stage}/{name}")
    runs.end_stage(run_id)
    if not children and not runs.external_parent:
        runs.end_pipeline(parent)
    return run_id


def public(obj: Any) -> dict:
    """A dataclass as a plain dict with tuples as lists (JSON/YAML-able)."""
    return json.loads(json.dumps(asdict(obj)))
