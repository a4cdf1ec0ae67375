"""DVC stage ``evaluate@<s>``: FID / KID / precision-recall and a sample grid of a model.

    python -m pipelines.evaluate --models models/stage2/model.pt [--num_samples 2000] ...

For each model, draws N samples from its coarse-to-fine chain (in batches, seeded) and
measures them against that stage's data (the pyramid level at its resolution) with each
configured feature extractor (cfebm.metrics): torch-fidelity's ``inception-v3-compat``
(weights from a path/URL or the standard download) and/or the domain CNN
``cfebm-<dataset>-cnn`` of ``pipelines.features``. Writes a DVC metrics JSON nested per
stage (keys ``<metric>_<extractor>``) and a PNG grid per stage, and logs both to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tqdm import tqdm

from cfebm import io as cio
from cfebm.config import ConfigError, SamplerConfig
from cfebm.data import PyramidStore
from cfebm.device import resolve
from cfebm.evaluate import EvalConfig, check_data, evaluate_model
from cfebm.metrics import EXTRACTORS, Extractors
from pipelines import _cli, models, tracking


@dataclass
class EvaluateStage(EvalConfig, Extractors):
    """Sample quality of trained models (params.yaml section ``evaluate``)."""

    models: list[str] = field(default_factory=list)
    """Model files (paths, URLs, ``runs:/`` or ``models:/`` URIs), one per stage."""
    data: str = "data/pyramid"
    """The pyramid dataset root whose levels are each stage's reference data."""
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model's sampler settings (cfebm SamplerConfig keys)."""
    out: str = "metrics/evaluate.json"
    """DVC metrics JSON, nested per stage."""
    grids: str = "outputs/evaluate"
    """Folder of the sample grids, ``stage_<s>.png``."""
    grid_count: int = 64
    """Samples shown in each grid (the first ones drawn)."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    mlflow: tracking.TrackingOptions = field(default_factory=tracking.TrackingOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.extractors or any(e not in EXTRACTORS for e in self.extractors):
            raise ConfigError(f"evaluate.extractors must be a non-empty subset of {EXTRACTORS}")
        try:
            replace(SamplerConfig(), **self.sampler)
        except TypeError as e:
            raise ConfigError(f"evaluate.sampler: {e}") from None


def run(p: EvaluateStage, log=print) -> dict:
    """Measure every model; write the metrics JSON and the grids; log to MLflow."""
    if not p.models:
        raise ConfigError("no models to evaluate: set evaluate.models or pass --models")
    device = resolve(p.device)
    extractors = p.make()  # weights resolved and checked before any sampling
    store = PyramidStore(p.data, p.data_storage_options)
    results, grids = {}, {}
    for url in p.models:
        model, ckpt = models.load_model(url, device)
        check_data(model, store, url)
        s, r = model.stage, model.resolution()
        desc = f"evaluate stage {s} ({r}x{r})"
        with tqdm(total=p.num_samples, desc=desc, unit="img", disable=None, leave=False) as bar:
            values, png = evaluate_model(
                model, ckpt, store, extractors, p, p.sampler, p.grid_count,
                progress=lambda done, _, bar=bar: bar.update(done - bar.n),
            )  # fmt: skip
        log(
            f"evaluate: stage {s} ({r}x{r}): "
            + ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        )
        results[f"stage_{s}"] = values
        grids[f"stage_{s}.png"] = png
    cio.write_results(p.out, results, p.grids, grids)
    tracking.log_stage("evaluate", p, results, grids, log=log)
    return results


main = _cli.stage_main(
    EvaluateStage,
    "evaluate",
    lambda p, _: run(p),
    __doc__,
    lambda p, _: f"wrote {p.out} and {p.grids}/",
)


if __name__ == "__main__":
    _cli.script(main)
