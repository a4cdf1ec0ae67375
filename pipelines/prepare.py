"""DVC stage ``prepare``: read a source and write uint8 images at the finest resolution.

    python -m pipelines.prepare [--params params.yaml] [--source cifar10 --url ARCHIVE] [...]

Writes a dataset root (``prepare.out``) whose manifest is written last (cfebm.data.layout).
"""

from __future__ import annotations

from cfebm.data import DataError, PrepareConfig, prepare
from pipelines import _cli


def main(argv: list[str] | None = None) -> None:
    try:
        config, extra = _cli.parse(PrepareConfig, "prepare", argv, doc=__doc__)
        if extra.dry_run:
            return _cli.print_settings(config)
        manifest = prepare(config, progress=lambda m: print(f"prepare: {m}", flush=True))
    except DataError as e:
        _cli.fail("prepare", e)
    skipped = manifest["skipped_count"]
    print(f"prepare: wrote {config.out}" + (f" ({skipped} skipped)" if skipped else ""))
    for item in manifest["skipped"][:20]:
        print(f"prepare: skipped {item['file']}: {item['reason']}")


if __name__ == "__main__":
    main()
