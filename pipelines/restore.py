"""DVC stage ``restore``: denoising and inpainting of held-out images with a trained energy.

    python -m pipelines.restore [--params params.yaml] [--model M] [--mode posterior] ...

Corrupts N test images (Gaussian noise of ``noise_sigma``; centre-square, random-pixel and
random-box masks) and restores them by Langevin on the model's energy (cfebm.restore:
``mode`` prior, the paper's, or posterior). Writes a DVC metrics JSON (PSNR and SSIM of
the corrupted input and of the restoration against the truth, per task), one PNG grid per
task (rows: corrupted, restored, truth), and logs both to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from cfebm import io as cio
from cfebm.data import to_unit_range
from cfebm.restore import RestoreConfig, restoration_study
from pipelines import _cli, models, tracking


@dataclass
class RestoreStage(RestoreConfig, models.HeldOutStage):
    """Restore held-out images with a trained energy (params.yaml section ``restore``)."""

    num_images: int | None = 256
    """Images restored (a seeded subset of the split); null: all."""
    metrics: str = "metrics/restore.json"
    images: str = "outputs/restore"
    """Folder of the PNG grids, ``<task>.png``."""


def run(p: RestoreStage, log=print) -> dict:
    """Restore, write the metrics JSON and the grids, log to MLflow; return the metrics."""
    model, store, stage, device = p.open()
    r = model.resolution(stage)
    truth = to_unit_range(store.subset(p.split, r, p.num_images, p.seed)).to(device)
    metrics, pngs = restoration_study(model, truth, p, stage, p.grid_images, log)
    cio.write_results(p.metrics, metrics, p.images, pngs)
    tracking.log_stage("restore", p, metrics, pngs, log=log)
    return metrics


main = _cli.stage_main(
    RestoreStage,
    "restore",
    lambda p, _: run(p),
    __doc__,
    lambda p, _: f"wrote {p.metrics} and {p.images}/<task>.png",
)


if __name__ == "__main__":
    _cli.script(main)
