"""``make ablation``: is coarse to fine better at equal compute? (the paper's central claim)

    python -m pipelines.ablation [--params params.yaml] [--budget_gflops 5e4] [...]

Trains the variants of :mod:`cfebm.ablation` (coarse_to_fine, finest_direct,
no_coarse_sampling) on the pyramid in this process, with the network, sampler and
schedule of the ``train`` section, and stops each at the same compute: what
coarse_to_fine spends on its whole schedule, unless ``budget_gflops`` is set. Each is
scored by FID/KID in the features stage's feature space at equal fractions of the budget
(the last point, at the finest resolution, is the comparison) and logged as one MLflow
run with FID against GFLOPs; the table of final scores, compute and wall time is printed
and written to ``out``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from cfebm import io as cio
from cfebm.ablation import VARIANTS, run_ablation, table
from cfebm.config import CFEBMConfig, ConfigError
from cfebm.data import PyramidStore
from cfebm.redact import public
from pipelines import _cli, tracking


@dataclass
class AblationOptions:
    """Coarse to fine against training the finest resolution directly and against
    progressive growing without coarse-to-fine sampling, at equal compute."""

    data: str = "data/pyramid"
    features: str = "models/features.pt"
    """The domain extractor (the features stage's output) that scores the samples."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    budget_gflops: float | None = None
    """Compute of each variant; null: what coarse_to_fine spends on its whole schedule."""
    num_samples: int = 500
    num_reference: int | None = 2000
    threads: int | None = None
    """torch CPU threads; null: all cores."""
    out: str = "metrics/ablation.json"
    mlflow: tracking.TrackingOptions = field(default_factory=tracking.TrackingOptions)

    def __post_init__(self) -> None:
        bad = sorted(set(self.variants) - set(VARIANTS))
        if bad or not self.variants:
            raise ConfigError(f"ablation.variants: {bad or 'none'} not in {VARIANTS}")


def log_variant(o: AblationOptions, name: str, cfg: CFEBMConfig, result: dict) -> None:
    """One MLflow run per variant: FID/KID against GFLOPs (the step), compute and time."""
    params = {"ablation": public(o), "variant": name, "config": dataclasses.asdict(cfg)}
    tags = {"cfebm.stage": "ablation", "cfebm.ablation.variant": name}
    key = f"ablation:{name}:{time.time_ns()}"
    with tracking.stage_run(o.mlflow, f"ablation-{name}", key, params, tags) as t:
        for point in result["curve"]:
            values = {"fid": point["fid"], "kid": point["kid"]}
            tracking.log_metrics(t.client, t.run_id, int(point["gflops"]), values)
        totals = {"seconds": result["seconds"], "gflops": result["gflops"]}
        tracking.log_metrics(t.client, t.run_id, 0, totals)


def run(o: AblationOptions, train, log=print) -> dict:
    from cfebm.metrics import make_extractor

    if o.threads:
        torch.set_num_threads(o.threads)
    store = PyramidStore(o.data)
    base = CFEBMConfig(train.model.with_channels(store.channels), train.sampler, train.optim)
    extractor = make_extractor("domain", features=o.features)
    results = run_ablation(
        base,
        store,
        extractor,
        o.variants,
        budget_gflops=o.budget_gflops,
        num_samples=o.num_samples,
        num_reference=o.num_reference,
        log=log,
        done=(lambda *a: log_variant(o, *a)) if o.mlflow.enabled else None,
    )
    cio.write_json(o.out, results)
    for line in table(results, extractor.label):
        log(f"ablation: {line}")
    return results


def _run(o: AblationOptions, extra) -> dict:
    from pipelines.train import TrainStage

    return run(o, TrainStage.read(extra.params))


main = _cli.stage_main(AblationOptions, "ablation", _run, __doc__)


if __name__ == "__main__":
    _cli.script(main)
