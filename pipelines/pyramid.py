"""DVC stage ``pyramid``: exact 2x2 mean pools of a prepared dataset, down to ``coarsest``.

    python -m pipelines.pyramid [--params params.yaml] [--input DIR] [--out DIR]

Reads section ``pyramid`` of params.yaml; options override it. Works shard by shard, so
memory is bounded by one shard, and writes the manifest last.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from cfebm.data import DataError, PyramidConfig, build_pyramid
from pipelines._params import json_mapping, load_section, overrides, stage_parser

SECTION = "pyramid"
DEFAULTS = PyramidConfig()


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = stage_parser("pipelines.pyramid", __doc__)
    p.add_argument("--input", help=f"prepared dataset root, local or fsspec URL [{d.input}]")
    p.add_argument("--out", help=f"pyramid dataset root to write, local or fsspec URL [{d.out}]")
    p.add_argument(
        "--coarsest",
        type=int,
        help=f"coarsest resolution, a power of two <= the prepared resolution [{d.coarsest}]",
    )
    p.add_argument(
        "--storage-options",
        type=json_mapping,
        metavar="JSON",
        help="fsspec options for --input and --out (default: none; s3fs reads AWS_* variables)",
    )
    return p


def resolve(argv: list[str] | None = None) -> tuple[PyramidConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    section = load_section(args.params or "params.yaml", SECTION, required=bool(args.params))
    names = {f.name for f in fields(PyramidConfig)}
    return PyramidConfig.from_dict({**section, **overrides(args, names)}), args


def main(argv: list[str] | None = None) -> None:
    try:
        config, args = resolve(argv)
        if args.dry_run:
            print(json.dumps(config.public(), indent=2))
            return
        manifest = build_pyramid(config)
    except DataError as e:
        sys.exit(f"pyramid: error: {e}")
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    print(f"pyramid: wrote {config.out}: resolutions {manifest['resolutions']}, images {counts}")


if __name__ == "__main__":
    main()
