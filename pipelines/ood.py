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

import torch

from cfebm import io as cio
from cfebm.data import PyramidStore, to_unit_range
from cfebm.images import grid_png
from cfebm.ood import (
    OODConfig,
    auroc_report,
    builtin_sets,
    energy_histogram_png,
    energy_scores,
    match_images,
    roc_curve,
    roc_plot_png,
)
from cfebm.sampling import to_uint8
from pipelines import _cli, models, tracking


@dataclass
class OODStage(OODConfig, models.HeldOutStage):
    """Out-of-distribution detection by energy (params.yaml section ``ood``)."""

    metrics: str = "metrics/ood.json"
    images: str = "outputs/ood"
    """Folder of roc.png, energy_hist.png and sets.png."""
    plots: str = "plots/ood"
    """DVC plots: the ROC curve of each set, ``<plots>/<set>.csv`` (fpr, tpr)."""


def _row(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` images, padded with black ones so each set fills one grid row."""
    return torch.cat([x[:n], x.new_full((max(0, n - len(x)), *x.shape[1:]), -1.0)])


def run(p: OODStage, log=print) -> dict:
    """Score, write the metrics JSON and the plots, log to MLflow; return the metrics."""
    model, store, stage, _ = p.open()
    r, c = model.resolution(stage), model.cfg.channels
    images = to_unit_range(store.subset(p.split, r, p.num_images, p.seed))
    sets = builtin_sets(images, p)
    for name, root in p.other.items():
        other = PyramidStore(root, p.data_storage_options)
        level = min((q for q in other.resolutions if q >= r), default=other.resolutions[-1])
        sets[name] = match_images(to_unit_range(other.read(p.split, level)[: p.num_images]), c, r)
    log(f"ood: {len(images)} in-distribution images at {r}x{r}; sets {list(sets)}")
    scores_in = energy_scores(model, images, batch_size=p.batch_size, stage=stage)
    scores_out = {
        k: energy_scores(model, x, batch_size=p.batch_size, stage=stage) for k, x in sets.items()
    }
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
    shown = torch.cat([_row(x, p.grid_images) for x in (images, *sets.values())])
    pngs = {
        "roc.png": roc_plot_png(scores_in, scores_out),
        "energy_hist.png": energy_histogram_png(scores_in, scores_out),
        "sets.png": grid_png(to_uint8(shown).numpy(), nrow=p.grid_images, scale=max(1, 64 // r)),
    }
    _cli.write_results(p.metrics, metrics, p.images, pngs)
    for name, s in scores_out.items():
        fpr, tpr = roc_curve(scores_in, s)
        rows = [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr)]
        cio.write_csv(cio.join(p.plots, f"{name}.csv"), rows, ["fpr", "tpr"])
    roc = {"in": scores_in.tolist(), **{k: v.tolist() for k, v in scores_out.items()}}
    tracking.log_stage("ood", p, metrics, pngs, {"scores.json": json.dumps(roc)}, log=log)
    return metrics


main = _cli.stage_main(
    OODStage, "ood", lambda p, _: run(p), __doc__, lambda p, _: f"wrote {p.metrics} and {p.images}/"
)


if __name__ == "__main__":
    _cli.script(main)
