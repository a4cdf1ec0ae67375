"""DVC stage ``pyramid``: exact 2x2 mean pools of a prepared dataset, down to ``coarsest``.

    python -m pipelines.pyramid [--params params.yaml] [--input DIR] [--out DIR]

Works shard by shard, so memory is bounded by one shard, and writes the manifest last.
"""

from __future__ import annotations

from cfebm.data import PyramidConfig, build_pyramid
from pipelines import _cli


def _done(config: PyramidConfig, manifest: dict) -> str:
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    return f"wrote {config.out}: resolutions {manifest['resolutions']}, images {counts}"


main = _cli.stage_main(PyramidConfig, "pyramid", lambda c, _: build_pyramid(c), __doc__, _done)


if __name__ == "__main__":
    _cli.script(main)
