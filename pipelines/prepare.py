"""DVC stage ``prepare``: read a source and write uint8 images at the finest resolution.

    python -m pipelines.prepare [--params params.yaml] [--source cifar10 --url ARCHIVE] [...]

Writes a dataset root (``prepare.out``) whose manifest is written last (cfebm.data.layout).
"""

from __future__ import annotations

from cfebm.data import PrepareConfig, prepare
from pipelines import _cli


def _done(config: PrepareConfig, manifest: dict) -> str:
    skipped = manifest["skipped_count"]
    lines = [f"wrote {config.out}" + (f" ({skipped} skipped)" if skipped else "")]
    lines += [f"skipped {item['file']}: {item['reason']}" for item in manifest["skipped"][:20]]
    return "\nprepare: ".join(lines)


main = _cli.stage_main(
    PrepareConfig,
    "prepare",
    lambda c, _: prepare(c, progress=lambda m: print(f"prepare: {m}", flush=True)),
    __doc__,
    _done,
)


if __name__ == "__main__":
    _cli.script(main)
