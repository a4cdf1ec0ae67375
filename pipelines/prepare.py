"""DVC stage ``prepare``: read a source and write uint8 images at the finest resolution.

    python -m pipelines.prepare [--params params.yaml] [--source shapes] [...]

Reads section ``prepare`` of params.yaml; options override it. Writes a dataset root
(``prepare.out``) whose manifest is written last (see ``cfebm.data.layout``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from cfebm.data import DataError, PrepareConfig, prepare
from cfebm.data.prepare import SOURCES
from pipelines._params import (
    json_mapping,
    load_section,
    nullable,
    nullable_int,
    overrides,
    stage_parser,
)

SECTION = "prepare"
DEFAULTS = PrepareConfig()


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = stage_parser("pipelines.prepare", __doc__)
    p.add_argument(
        "--source",
        choices=SOURCES,
        help=f"digits: scikit-learn 8x8 digits; shapes: generated scenes; cifar10: a CIFAR-10 "
        f"python archive at --url; folder: the images under --url [{d.source}]",
    )
    p.add_argument(
        "--url",
        type=nullable,
        help="cifar10: archive path/URL (or extracted folder); folder: folder path/URL; "
        "local or any fsspec URL such as s3://bucket/prefix",
    )
    p.add_argument("--out", help=f"dataset root to write, local or fsspec URL [{d.out}]")
    p.add_argument(
        "--resolution",
        type=int,
        help=f"finest resolution, a power of two; images are resized to it [{d.resolution}]",
    )
    p.add_argument(
        "--channels",
        type=nullable_int,
        help="1 (grayscale) or 3 (RGB); 'none' keeps the source's own (digits 1, others 3)",
    )
    p.add_argument("--seed", type=int, help=f"seed of the split and of shape generation [{d.seed}]")
    p.add_argument(
        "--test-fraction",
        type=float,
        help=f"digits, folder: share of images in the test split [{d.test_fraction}]",
    )
    p.add_argument("--num-train", type=int, help=f"shapes: training scenes [{d.num_train}]")
    p.add_argument("--num-test", type=int, help=f"shapes: test scenes [{d.num_test}]")
    p.add_argument(
        "--domain",
        type=nullable,
        help="shapes: 'a' (red-ish objects), 'b' (blue-ish, same scenes) or 'none' (all colours)",
    )
    p.add_argument(
        "--folder-labels",
        action=argparse.BooleanOptionalAction,
        help=f"folder: use first-level sub-folder names as class labels [{d.folder_labels}]",
    )
    p.add_argument(
        "--resample",
        choices=["nearest", "box", "bilinear", "bicubic", "lanczos"],
        help=f"PIL filter used for resizing [{d.resample}]",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        help=f"images per shard, the unit that training workers read [{d.shard_size}]",
    )
    p.add_argument(
        "--skip-corrupt",
        action=argparse.BooleanOptionalAction,
        help="skip unreadable images and list them in the manifest instead of failing "
        f"[{d.skip_corrupt}]",
    )
    p.add_argument(
        "--storage-options",
        type=json_mapping,
        metavar="JSON",
        help='fsspec options for --url and --out, e.g. \'{"endpoint_url": "http://..."}\' '
        "(default: none; s3fs reads AWS_* environment variables)",
    )
    return p


def resolve(argv: list[str] | None = None) -> tuple[PrepareConfig, argparse.Namespace]:
    """The config from params.yaml's section, overridden by the command line."""
    args = build_parser().parse_args(argv)
    section = load_section(args.params or "params.yaml", SECTION, required=bool(args.params))
    names = {f.name for f in fields(PrepareConfig)}
    return PrepareConfig.from_dict({**section, **overrides(args, names)}), args


def main(argv: list[str] | None = None) -> None:
    try:
        config, args = resolve(argv)
        if args.dry_run:
            print(json.dumps({**config.public(), "out": config.out}, indent=2))
            return
        manifest = prepare(config, progress=lambda m: print(f"prepare: {m}", flush=True))
    except DataError as e:
        sys.exit(f"prepare: error: {e}")
    skipped = manifest["skipped_count"]
    print(f"prepare: wrote {config.out}" + (f" ({skipped} skipped)" if skipped else ""))
    for item in manifest["skipped"][:20]:
        print(f"prepare: skipped {item['file']}: {item['reason']}")


if __name__ == "__main__":
    main()
