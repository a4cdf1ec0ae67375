"""DVC stage ``restore``: denoising and inpainting of held-out images with a trained energy.

    python -m pipelines.restore [--params params.yaml] [--model M] [--mode posterior] ...

Corrupts N test images (Gaussian noise of ``noise_sigma``; centre-square, random-pixel and
random-box masks) and restores them by Langevin on the model's energy (cfebm.restore:
``mode`` prior, the paper's, or posterior). Writes a DVC metrics JSON (PSNR and SSIM of
the corrupted input and of the restoration against the truth, per task), one PNG grid per
task (rows: corrupted, restored, truth), and logs both to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cfebm.data import PyramidStore, to_unit_range
from cfebm.evaluate import check_data
from cfebm.restore import RestoreConfig, evaluate_restoration
from pipelines import _cli, models, tracking


@dataclass
class RestoreStage(RestoreConfig, models.Runtime):
    """Restore held-out images with a trained energy (params.yaml section ``restore``)."""

    model: str = "models/stage2/model.pt"
    """The trained model (path, URL, ``runs:/`` or ``models:/`` URI)."""
    data: str = "data/pyramid"
    """Pyramid dataset root with the held-out images."""
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    num_images: int | None = 256
    """Images restored (a seeded subset of the split); null: all."""
    stage: int | None = None
    """Stage whose resolution and energies are used; null: the model's finest."""
    metrics: str = "metrics/restore.json"
    images: str = "outputs/restore"
    """Folder of the PNG grids, ``<task>.png``."""
    grid_images: int = 16
    """Images per row of each grid."""


def run(p: RestoreStage, log=print) -> dict:
    """Restore, write the metrics JSON and the grids, log to MLflow; return the metrics."""
    device = p.setup()
    model, _ = models.load_model(p.model, device, p.stage)
    store = PyramidStore(p.data, p.data_storage_options)
    check_data(model, store, p.model)
    stage = model.stage if p.stage is None else p.stage
    r = model.resolution(stage)
    truth = to_unit_range(store.subset(p.split, r, p.num_images, p.seed)).to(device)
    log(f"restore: {len(truth)} {p.split} images at {r}x{r}, stage {stage}, mode {p.mode}")
    results = evaluate_restoration(
        model, truth, p, stage=stage, progress=lambda m: log(f"restore: {m}")
    )
    metrics = {
        "stage": stage,
        "resolution": r,
        "num_images": len(truth),
        **{task: res.metrics for task, res in results.items()},
    }
    scale = max(1, 64 // r)
    pngs = {f"{task}.png": res.picture(p.grid_images, scale) for task, res in results.items()}
    _cli.write_results(p.metrics, metrics, p.images, pngs)
    if tracking.log_stage(p.mlflow, "restore", {"restore": _cli.public(p)}, metrics, pngs):
        log("restore: logged to MLflow")
    return metrics


main = _cli.stage_main(
    RestoreStage, "restore", run, __doc__, lambda p: f"wrote {p.metrics} and {p.images}/<task>.png"
)


if __name__ == "__main__":
    main()
