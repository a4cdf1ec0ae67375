"""DVC stage ``features``: train the domain feature extractor for offline FID/KID.

    python -m pipelines.features [--params params.yaml] [--data DIR] [--out FILE] [...]

Trains ``cfebm-<dataset>-cnn`` (cfebm.features), a small CNN classifier, on the labelled
pyramid dataset (digits, shapes, a labelled folder) and writes its weights file and a DVC
metrics JSON with its test accuracy at every pyramid level. ``pipelines.evaluate`` uses
it where Inception weights are not available; its name is part of every metric key.
Reads section ``features`` of params.yaml; options override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, fields

from cfebm import io as cio
from cfebm.data import DataError, PyramidStore
from cfebm.features import (
    FeatureError,
    FeatureTrainConfig,
    LabelledImages,
    accuracy,
    check_name,
    default_name,
    save_feature_net,
    train_feature_net,
)
from pipelines._params import json_mapping, load_section, nullable, overrides, stage_parser

SECTION = "features"


@dataclass
class FeaturesStage:
    """Where the ``features`` stage reads and writes (the training knobs are
    :class:`cfebm.features.FeatureTrainConfig`, in the same params section)."""

    data: str = "data/pyramid"
    """Labelled pyramid dataset root (local path or fsspec URL)."""
    storage_options: dict = field(default_factory=dict)
    out: str = "models/features.pt"
    """Weights file to write (local path or fsspec URL)."""
    metrics: str = "metrics/features.json"
    """DVC metrics JSON: test accuracy per resolution and label field."""
    name: str | None = None
    """Extractor name; null: cfebm-<dataset source>-cnn."""


STAGE_FIELDS = {f.name for f in fields(FeaturesStage)}
TRAIN_FIELDS = {f.name for f in fields(FeatureTrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    s, t = FeaturesStage(), FeatureTrainConfig()
    p = stage_parser("pipelines.features", __doc__)
    p.add_argument("--data", help=f"labelled pyramid dataset root, path or URL [{s.data}]")
    p.add_argument(
        "--storage-options",
        type=json_mapping,
        metavar="JSON",
        help="fsspec options for --data (default: none; --out and --metrics use the "
        "environment, e.g. AWS_* variables for s3://)",
    )
    p.add_argument("--out", help=f"weights file to write, path or URL [{s.out}]")
    p.add_argument("--metrics", help=f"metrics JSON to write (DVC metrics) [{s.metrics}]")
    p.add_argument(
        "--name",
        type=nullable,
        help="extractor name, lower-case letters, digits and '-' (it becomes part of metric "
        "names) [cfebm-<dataset>-cnn]",
    )
    p.add_argument("--epochs", type=int, help=f"training epochs [{t.epochs}]")
    p.add_argument("--batch-size", type=int, help=f"images per step [{t.batch_size}]")
    p.add_argument("--lr", type=float, help=f"peak learning rate (AdamW, one-cycle) [{t.lr}]")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay [{t.weight_decay}]")
    p.add_argument("--width", type=int, help=f"channels of the first conv [{t.width}]")
    p.add_argument(
        "--feature-dim", type=int, help=f"size of the feature (penultimate) layer [{t.feature_dim}]"
    )
    p.add_argument(
        "--multiscale",
        action=argparse.BooleanOptionalAction,
        help="also train on every coarser pyramid level, resized to the finest resolution "
        f"[{t.multiscale}]",
    )
    p.add_argument("--seed", type=int, help=f"seed of initialisation and data order [{t.seed}]")
    return p


def resolve(argv: list[str] | None = None):
    """(stage settings, training config, args) from params.yaml's section and the CLI."""
    args = build_parser().parse_args(argv)
    section = load_section(args.params or "params.yaml", SECTION, required=bool(args.params))
    values = {**section, **overrides(args, STAGE_FIELDS | TRAIN_FIELDS)}
    unknown = sorted(set(values) - STAGE_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise FeatureError(f"unknown {SECTION} parameter(s) {unknown}")
    stage = FeaturesStage(**{k: v for k, v in values.items() if k in STAGE_FIELDS})
    train = FeatureTrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})
    return stage, train, args


def label_layout(store: PyramidStore) -> tuple[list[str], list[int]]:
    """(field names, classes per field) of a labelled dataset, from its manifest."""
    if not store.has_labels:
        raise FeatureError(
            f"{store.url} has no labels: the domain extractor is a classifier and needs a "
            "labelled dataset (digits, shapes, or a folder with folder_labels)"
        )
    names = store.label_names
    if names and isinstance(names[0], list):
        counts = [len(n) for n in names]
    elif names:
        counts = [len(names)]
    else:
        labels = store.labels("train").reshape(store.count("train"), -1)
        counts = [int(c) + 1 for c in labels.max(axis=0)]
    fields_ = store.manifest.get("label_fields") or (
        ["class"] if len(counts) == 1 else [f"label{j}" for j in range(len(counts))]
    )
    return list(fields_), counts


def run(stage: FeaturesStage, train: FeatureTrainConfig, log=print) -> dict:
    """Train, evaluate on the test split and write the weights; return the metrics."""
    store = PyramidStore(stage.data, stage.storage_options)
    source = (store.manifest.get("source") or {}).get("source", "data")
    name = check_name(stage.name or default_name(source))
    label_fields, num_classes = label_layout(store)
    data = LabelledImages(
        {r: store.read("train", r) for r in store.resolutions}, store.labels("train")
    )
    classes = ", ".join(f"{f}: {k}" for f, k in zip(label_fields, num_classes))
    log(
        f"features: training {name} on {store.count('train')} {source} images at "
        f"{store.resolutions} (classes per label: {classes})"
    )

    def progress(epoch: int, loss: float) -> None:
        log(f"features: epoch {epoch + 1}/{train.epochs} loss {loss:.4f}")

    net = train_feature_net(data, train, num_classes, progress=progress)
    test_accuracy = {}
    if "test" in store.splits and store.count("test") > 0:
        labels = store.labels("test")
        for r in store.resolutions[::-1]:
            acc = accuracy(net, store.read("test", r), labels)
            test_accuracy[f"r{r}"] = dict(zip(label_fields, acc))
    else:
        log("features: no test split: accuracy not measured")
    meta = {
        "dataset": source,
        "data": stage.data,
        "resolution": net.cfg.resolution,
        "resolutions": store.resolutions,
        "channels": net.cfg.channels,
        "label_fields": label_fields,
        "num_classes": num_classes,
        "train_count": store.count("train"),
        "test_accuracy": test_accuracy,
        "feature_scale": float(net.feature_scale),
        "train": asdict(train),
    }
    save_feature_net(net, stage.out, name, meta)
    return {"test_accuracy": test_accuracy}


def main(argv: list[str] | None = None) -> None:
    try:
        stage, train, args = resolve(argv)
        if args.dry_run:
            print(json.dumps({**asdict(stage), **asdict(train)}, indent=2))
            return
        metrics = run(stage, train)
        cio.write_bytes(stage.metrics, (json.dumps(metrics, indent=2) + "\n").encode())
    except (DataError, FeatureError) as e:
        sys.exit(f"features: error: {e}")
    accuracy_text = json.dumps(metrics["test_accuracy"])
    print(f"features: wrote {stage.out} and {stage.metrics}; test accuracy {accuracy_text}")


if __name__ == "__main__":
    main()
