"""DVC stage ``ood``: out-of-distribution detection with the energy as the score.

    python -m pipelines.ood [--params params.yaml] [--model M] [--other '{shapes: ROOT}'] ...

Scores the held-out split and each OOD set with the model's energy (cfebm.ood): uniform
noise, constant images, linear interpolations between test images, and other data sets
(pyramid roots, converted to the model's channels and resolution). Writes a DVC metrics
JSON (AUROC per set and their mean, mean energies), a ROC plot, energy histograms and a
grid of each set, and logs them to MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cfebm import io as cio
from cfebm.data import PyramidStore, to_unit_range
from cfebm.ood import OODConfig, ood_study
from pipelines import _cli, models, tracking


@dataclass
class OODStage(OODConfig, models.HeldOutStage):
    """Out-of-distribution detection by energy (params.yaml section ``ood``)."""

    metrics: str = "metrics/ood.json"
    images: str = "outputs/ood"
    """Folder of roc.png, energy_hist.png and sets.png."""
    plots: str = "plots/ood"
    """DVC plots: the ROC curve of each set, ``<plots>/<set>.csv`` (fpr, tpr)."""


def run(p: OODStage, log=print) -> dict:
    """Score, write the metrics JSON and the plots, log to MLflow; return the metrics."""
    model, store, stage, _ = p.open()
    r = model.resolution(stage)
    images = to_unit_range(store.subset(p.split, r, p.num_images, p.seed))
    other = {name: PyramidStore(root, p.data_storage_options) for name, root in p.other.items()}
    study = ood_study(model, images, p, stage, other, p.grid_images, log, p.split)
    cio.write_results(p.metrics, study.metrics, p.images, study.pngs)
    for name, rows in study.roc.items():
        cio.write_csv(cio.join(p.plots, f"{name}.csv"), rows, ["fpr", "tpr"])
    texts = {"scores.json": json.dumps(study.scores)}
    tracking.log_stage("ood", p, study.metrics, study.pngs, texts, log=log)
    return study.metrics


main = _cli.stage_main(
    OODStage, "ood", lambda p, _: run(p), __doc__, lambda p, _: f"wrote {p.metrics} and {p.images}/"
)


if __name__ == "__main__":
    _cli.script(main)
