"""DVC stage ``ood``: out-of-distribution detection with the energy as the score.

    python -m pipelines.ood [--params params.yaml] [--model M] [--other shapes=ROOT] [...]

Scores the held-out split and each OOD set with the model's energy (cfebm.ood): uniform
noise, constant images, linear interpolations between test images, and other data sets
(pyramid roots, converted to the model's channels and resolution). Writes a DVC metrics
JSON (AUROC per set and their mean, mean energies), a ROC plot, energy histograms and a
grid of each set, and logs them to MLflow. Reads section ``ood`` of params.yaml; options
override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

import torch

from cfebm.config import ConfigError
from cfebm.data import DataError, PyramidStore, to_unit_range
from cfebm.images import grid_png
from cfebm.ood import (
    BUILTIN_SETS,
    OODConfig,
    auroc_report,
    builtin_sets,
    energy_histogram_png,
    energy_scores,
    match_images,
    roc_plot_png,
)
from cfebm.sampling import to_uint8
from pipelines._params import json_mapping, nullable_int, stage_parser
from pipelines._uses import (
    MlflowSettings,
    check_channels,
    common_arguments,
    dataclass_fields,
    grid_scale,
    load_model,
    log_to_mlflow,
    read_images,
    resolve_section,
    set_threads,
    torch_device,
    write_json,
    write_pngs,
)

SECTION = "ood"


@dataclass
class OODParams:
    """Inputs and outputs of the ``ood`` stage; the algorithm's settings are
    :class:`cfebm.ood.OODConfig`, in the same params section."""

    model: str = "models/stage2/model.pt"
    """Checkpoint (path or URL) of the trained model."""
    data: str = "data/pyramid"
    """Pyramid dataset root of the in-distribution data."""
    data_storage_options: dict = field(default_factory=dict)
    split: str = "test"
    """In-distribution split (and the split read from the ``other`` data sets)."""
    stage: int | None = None
    """Stage whose energy scores; null: the model's finest."""
    metrics: str = "metrics/ood.json"
    """DVC metrics JSON."""
    images: str = "outputs/ood"
    """Folder of roc.png, energy_hist.png and sets.png."""
    grid_images: int = 16
    """Images of each set in sets.png."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    threads: int | None = None
    """torch CPU threads; null: torch's default (all cores)."""
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)

    def __post_init__(self) -> None:
        if isinstance(self.mlflow, dict):
            self.mlflow = MlflowSettings(**self.mlflow)
        if self.grid_images < 1:
            raise ConfigError("ood.grid_images must be >= 1")


IO_FIELDS = dataclass_fields(OODParams)
ALGO_FIELDS = dataclass_fields(OODConfig)


def named_root(text: str) -> tuple[str, str]:
    """argparse type for NAME=ROOT."""
    name, sep, root = text.partition("=")
    if not sep or not name or not root:
        raise argparse.ArgumentTypeError(f"expected NAME=ROOT, got {text!r}")
    return name, root


def build_parser() -> argparse.ArgumentParser:
    d, a = OODParams(), OODConfig()
    p = stage_parser("pipelines.ood", __doc__)
    p.add_argument("--model", help=f"model checkpoint, path or URL [{d.model}]")
    p.add_argument("--data", help=f"in-distribution pyramid root, path or URL [{d.data}]")
    p.add_argument(
        "--data-storage-options",
        type=json_mapping,
        metavar="JSON",
        help="fsspec options for --data and the other data sets",
    )
    p.add_argument("--split", help=f"held-out split, also of the other data sets [{d.split}]")
    p.add_argument("--stage", type=nullable_int, help="stage to score with; 'none': finest [none]")
    p.add_argument("--metrics", help=f"metrics JSON to write (DVC metrics) [{d.metrics}]")
    p.add_argument("--images", help=f"folder for the plots [{d.images}]")
    p.add_argument("--grid-images", type=int, help=f"images per set in sets.png [{d.grid_images}]")
    common_arguments(p, d.device)
    g = p.add_argument_group("OOD sets (cfebm.ood.OODConfig)")
    g.add_argument("--sets", nargs="*", choices=BUILTIN_SETS, help=f"built-in sets {list(a.sets)}")
    g.add_argument(
        "--other",
        type=named_root,
        action="append",
        metavar="NAME=ROOT",
        help="another data set (a pyramid root, path or URL) scored as OOD; repeatable; "
        "replaces the params file's mapping [none]",
    )
    g.add_argument(
        "--num-images",
        type=int,
        help=f"images per OOD set, and at most this many in-distribution [{a.num_images}]",
    )
    g.add_argument(
        "--interpolation-alpha",
        type=float,
        help=f"weight of the first image of each interpolated pair [{a.interpolation_alpha}]",
    )
    g.add_argument("--batch-size", type=int, help=f"images per energy batch [{a.batch_size}]")
    g.add_argument("--seed", type=int, help=f"seeds subsets and generated sets [{a.seed}]")
    return p


def resolve(argv: list[str] | None = None) -> tuple[OODParams, OODConfig, argparse.Namespace]:
    """The stage's settings from params.yaml's section, overridden by the command line."""
    values, args = resolve_section(build_parser(), argv, SECTION, IO_FIELDS | ALGO_FIELDS)
    if args.other is not None:
        values["other"] = dict(args.other)
    params = OODParams(**{k: v for k, v in values.items() if k in IO_FIELDS})
    try:
        config = OODConfig(**{k: v for k, v in values.items() if k in ALGO_FIELDS})
    except TypeError as e:
        raise ConfigError(f"ood: {e}") from e
    return params, config, args


def public(params: OODParams, config: OODConfig) -> dict:
    return json.loads(json.dumps({**asdict(params), **asdict(config)}))


def _row(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` images, padded with black ones so each set fills one grid row."""
    pad = x.new_full((max(0, n - len(x)), *x.shape[1:]), -1.0)
    return torch.cat([x[:n], pad])


def run(params: OODParams, config: OODConfig, log=print) -> dict:
    """Score, write the metrics JSON and the plots, log to MLflow; return the metrics."""
    set_threads(params.threads)
    device = torch_device(params.device)
    model, _ = load_model(params.model, device, params.stage)
    store = PyramidStore(params.data, params.data_storage_options)
    check_channels(model, store, params.model)
    stage = model.stage if params.stage is None else params.stage
    r, c = model.resolution(stage), model.cfg.channels
    images = read_images(store, params.split, r, config.num_images, config.seed)
    sets = builtin_sets(images, config)
    for name, root in config.other.items():
        other = PyramidStore(root, params.data_storage_options)
        level = min((q for q in other.resolutions if q >= r), default=other.resolutions[-1])
        x = to_unit_range(other.read(params.split, level)[: config.num_images])
        sets[name] = match_images(x, c, r)
    log(f"ood: {len(images)} in-distribution images at {r}x{r}; sets {list(sets)}")

    def scores(x: torch.Tensor) -> torch.Tensor:
        return energy_scores(model, x, batch_size=config.batch_size, stage=stage)

    scores_in = scores(images)
    scores_out = {name: scores(x) for name, x in sets.items()}
    report = auroc_report(scores_in, scores_out)
    log("ood: AUROC " + ", ".join(f"{k} {v:.4f}" for k, v in report.items()))
    metrics = {
        "stage": stage,
        "resolution": r,
        "num_in": len(images),
        "auroc": report,
        "energy_mean": {
            "in": float(scores_in.mean()),
            **{k: float(v.mean()) for k, v in scores_out.items()},
        },
    }
    n = params.grid_images
    shown = torch.cat([_row(x, n) for x in (images, *sets.values())])
    pngs = {
        "roc.png": roc_plot_png(scores_in, scores_out),
        "energy_hist.png": energy_histogram_png(scores_in, scores_out),
        "sets.png": grid_png(to_uint8(shown).numpy(), nrow=n, scale=grid_scale(r)),
    }
    write_json(params.metrics, metrics)
    write_pngs(params.images, pngs)
    if params.mlflow.enabled:
        run_id = log_to_mlflow(params.mlflow, SECTION, public(params, config), metrics, pngs)
        log(f"ood: logged to MLflow run {run_id}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    try:
        params, config, args = resolve(argv)
        if args.dry_run:
            print(json.dumps(public(params, config), indent=2))
            return
        run(params, config)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"ood: error: {e}")
    print(f"ood: wrote {params.metrics} and {params.images}/")


if __name__ == "__main__":
    main()
