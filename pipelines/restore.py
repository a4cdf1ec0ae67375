"""DVC stage ``restore``: denoising and inpainting of held-out images with a trained energy.

    python -m pipelines.restore [--params params.yaml] [--model M] [--data D] [...]

Corrupts N test images (Gaussian noise of ``noise_sigma``; centre-square, random-pixel and
random-box masks) and restores them by Langevin on the model's energy (cfebm.restore).
Writes a DVC metrics JSON (PSNR and SSIM of the corrupted input and of the restoration
against the truth, per task), one PNG grid per task (rows: corrupted, restored, truth),
and logs both to MLflow. Reads section ``restore`` of params.yaml; options override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

import torch

from cfebm.config import ConfigError
from cfebm.data import DataError, PyramidStore
from cfebm.images import grid_png
from cfebm.restore import FILLS, MASK_KINDS, RestoreConfig, evaluate_restoration
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

SECTION = "restore"


@dataclass
class RestoreParams:
    """Inputs and outputs of the ``restore`` stage; the algorithm's settings are
    :class:`cfebm.restore.RestoreConfig`, in the same params section."""

    model: str = "models/stage2/model.pt"
    """Checkpoint (path or URL) of the trained model."""
    data: str = "data/pyramid"
    """Pyramid dataset root with the held-out images."""
    data_storage_options: dict = field(default_factory=dict)
    split: str = "test"
    num_images: int | None = 256
    """Images restored (a seeded subset of the split); null: all."""
    stage: int | None = None
    """Stage whose resolution and energies are used; null: the model's finest."""
    metrics: str = "metrics/restore.json"
    """DVC metrics JSON."""
    images: str = "outputs/restore"
    """Folder of the PNG grids, ``<task>.png``."""
    grid_images: int = 16
    """Images per row of each grid."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    threads: int | None = None
    """torch CPU threads; null: torch's default (all cores)."""
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)

    def __post_init__(self) -> None:
        if isinstance(self.mlflow, dict):
            self.mlflow = MlflowSettings(**self.mlflow)
        if self.num_images is not None and self.num_images < 1:
            raise ConfigError("restore.num_images must be >= 1 or null")
        if self.grid_images < 1:
            raise ConfigError("restore.grid_images must be >= 1")


IO_FIELDS = dataclass_fields(RestoreParams)
ALGO_FIELDS = dataclass_fields(RestoreConfig)


def build_parser() -> argparse.ArgumentParser:
    d, a = RestoreParams(), RestoreConfig()
    p = stage_parser("pipelines.restore", __doc__)
    p.add_argument("--model", help=f"model checkpoint, path or URL [{d.model}]")
    p.add_argument("--data", help=f"pyramid dataset root, path or URL [{d.data}]")
    p.add_argument(
        "--data-storage-options",
        type=json_mapping,
        metavar="JSON",
        help="fsspec options for --data",
    )
    p.add_argument("--split", help=f"split of held-out images [{d.split}]")
    p.add_argument(
        "--num-images", type=nullable_int, help=f"images to restore; 'none': all [{d.num_images}]"
    )
    p.add_argument(
        "--stage", type=nullable_int, help="stage to restore at; 'none': the finest [none]"
    )
    p.add_argument("--metrics", help=f"metrics JSON to write (DVC metrics) [{d.metrics}]")
    p.add_argument("--images", help=f"folder for the <task>.png grids [{d.images}]")
    p.add_argument("--grid-images", type=int, help=f"images per grid row [{d.grid_images}]")
    common_arguments(p, d.device)
    g = p.add_argument_group("restoration (cfebm.restore.RestoreConfig)")
    g.add_argument(
        "--noise-sigma",
        type=float,
        help=f"denoising: std of the Gaussian noise in the [-1, 1] scale [{a.noise_sigma}]",
    )
    g.add_argument(
        "--fidelity",
        type=float,
        help="denoising: weight of the Gaussian likelihood of the noisy image (x sigma^-2); "
        f"0: Langevin on the energy alone, as in the paper [{a.fidelity}]",
    )
    g.add_argument(
        "--masks", nargs="+", choices=MASK_KINDS, help=f"inpainting masks {list(a.masks)}"
    )
    g.add_argument(
        "--mask-fraction",
        type=float,
        help=f"centre: share of the area; pixels: share of missing pixels [{a.mask_fraction}]",
    )
    g.add_argument("--num-boxes", type=int, help=f"boxes: boxes per image [{a.num_boxes}]")
    g.add_argument(
        "--box-fraction", type=float, help=f"boxes: box side / image side [{a.box_fraction}]"
    )
    g.add_argument("--fill", choices=FILLS, help=f"initial value of missing pixels [{a.fill}]")
    g.add_argument(
        "--coarse-to-fine",
        action=argparse.BooleanOptionalAction,
        help="restore through all stages from the coarsest (as the model samples) rather "
        f"than only at the image's stage [{a.coarse_to_fine}]",
    )
    g.add_argument(
        "--denoise-chain",
        type=json_mapping,
        metavar="JSON",
        help="denoising Langevin: steps (per stage), step_size, noise_start, noise_end "
        f"{json.dumps(asdict(a.denoise_chain))}",
    )
    g.add_argument(
        "--inpaint-chain",
        type=json_mapping,
        metavar="JSON",
        help=f"inpainting Langevin, same keys {json.dumps(asdict(a.inpaint_chain))}",
    )
    g.add_argument("--seed", type=int, help=f"seeds subset, corruptions and chains [{a.seed}]")
    return p


def resolve(
    argv: list[str] | None = None,
) -> tuple[RestoreParams, RestoreConfig, argparse.Namespace]:
    """The stage's settings from params.yaml's section, overridden by the command line."""
    values, args = resolve_section(
        build_parser(), argv, SECTION, IO_FIELDS | ALGO_FIELDS, {"denoise_chain", "inpaint_chain"}
    )
    params = RestoreParams(**{k: v for k, v in values.items() if k in IO_FIELDS})
    config = RestoreConfig.from_dict({k: v for k, v in values.items() if k in ALGO_FIELDS})
    return params, config, args


def public(params: RestoreParams, config: RestoreConfig) -> dict:
    return {**asdict(params), **config.to_dict()}


def grids(results, count: int, resolution: int) -> dict[str, bytes]:
    """One PNG per task: corrupted, restored and truth rows of ``count`` images."""
    out = {}
    for task, r in results.items():
        rows = torch.cat([r.corrupted[:count], r.restored[:count], r.truth[:count]])
        n = min(count, len(r.truth))
        out[f"{task}.png"] = grid_png(
            to_uint8(rows).cpu().numpy(), nrow=n, scale=grid_scale(resolution)
        )
    return out


def run(params: RestoreParams, config: RestoreConfig, log=print) -> dict:
    """Restore, write the metrics JSON and the grids, log to MLflow; return the metrics."""
    set_threads(params.threads)
    device = torch_device(params.device)
    model, _ = load_model(params.model, device, params.stage)
    store = PyramidStore(params.data, params.data_storage_options)
    check_channels(model, store, params.model)
    stage = model.stage if params.stage is None else params.stage
    r = model.resolution(stage)
    truth = read_images(store, params.split, r, params.num_images, config.seed).to(device)
    log(f"restore: {len(truth)} {params.split} images at {r}x{r}, stage {stage}")
    results = evaluate_restoration(
        model, truth, config, stage=stage, progress=lambda m: log(f"restore: {m}")
    )
    metrics = {
        "stage": stage,
        "resolution": r,
        "num_images": len(truth),
        **{task: res.metrics for task, res in results.items()},
    }
    pngs = grids(results, params.grid_images, r)
    write_json(params.metrics, metrics)
    write_pngs(params.images, pngs)
    if params.mlflow.enabled:
        run_id = log_to_mlflow(params.mlflow, SECTION, public(params, config), metrics, pngs)
        log(f"restore: logged to MLflow run {run_id}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    try:
        params, config, args = resolve(argv)
        if args.dry_run:
            print(json.dumps(public(params, config), indent=2))
            return
        run(params, config)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"restore: error: {e}")
    print(f"restore: wrote {params.metrics} and {params.images}/<task>.png")


if __name__ == "__main__":
    main()
