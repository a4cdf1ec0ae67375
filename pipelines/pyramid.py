"""DVC stage ``pyramid``: exact 2x2 mean pools of a prepared dataset, down to ``coarsest``.

    python -m pipelines.pyramid [--params params.yaml] [--input DIR] [--out DIR]

Works shard by shard, so memory is bounded by one shard, and writes the manifest last.
"""

from __future__ import annotations

from cfebm.data import DataError, PyramidConfig, build_pyramid
from pipelines import _cli


def main(argv: list[str] | None = None) -> None:
    try:
        config, extra = _cli.parse(PyramidConfig, "pyramid", argv, doc=__doc__)
        if extra.dry_run:
            return _cli.print_settings(config)
        manifest = build_pyramid(config)
    except DataError as e:
        _cli.fail("pyramid", e)
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    print(f"pyramid: wrote {config.out}: resolutions {manifest['resolutions']}, images {counts}")


if __name__ == "__main__":
    main()
