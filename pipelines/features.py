"""DVC stage ``features``: train the domain feature extractor for offline FID/KID.

    python -m pipelines.features [--params params.yaml] [--data DIR] [--epochs 5] ...

Trains ``cfebm-<dataset>-cnn`` (cfebm.features), a small CNN classifier, on the labelled
pyramid dataset (digits, shapes, a labelled folder) and writes its weights file and a DVC
metrics JSON with its test accuracy at every pyramid level. ``pipelines.evaluate`` uses it
where Inception weights are not available; its name is part of every metric key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cfebm import io as cio
from cfebm.data import PyramidStore
from cfebm.features import FeatureTrainConfig, fit_extractor, save_feature_net
from pipelines import _cli


@dataclass
class FeaturesStage(FeatureTrainConfig):
    """Train the domain feature extractor (params.yaml section ``features``)."""

    data: str = "data/pyramid"
    """Labelled pyramid dataset root (local path or fsspec URL)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    out: str = "models/features.pt"
    """Weights file to write (local path or fsspec URL)."""
    metrics: str = "metrics/features.json"
    """DVC metrics JSON: test accuracy per resolution and label field."""
    name: str | None = None
    """Extractor name; null: cfebm-<dataset source>-cnn."""


def run(p: FeaturesStage, extra=None) -> dict:
    """Train and write the extractor and its metrics JSON; return the metrics."""
    net, name, meta = fit_extractor(PyramidStore(p.data, p.storage_options), p, p.name)
    save_feature_net(net, p.out, name, {**meta, "data": p.data})
    metrics = {"test_accuracy": meta["test_accuracy"]}
    cio.write_json(p.metrics, metrics)
    return metrics


main = _cli.stage_main(
    FeaturesStage,
    "features",
    run,
    __doc__,
    lambda p, m: f"wrote {p.out} and {p.metrics}; test accuracy {json.dumps(m['test_accuracy'])}",
)


if __name__ == "__main__":
    _cli.script(main)
