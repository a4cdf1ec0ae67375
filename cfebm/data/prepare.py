"""The ``prepare`` stage: a source -> uint8 images at the finest resolution, in shards.

Writes a dataset root with one level (``resolutions: [finest]``); ``pyramid`` adds the
coarser levels. See ``cfebm.data.layout`` for the format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from cfebm.data import layout
from cfebm.data.errors import DataError
from cfebm.data.images import RESAMPLE
from cfebm.data.pyramid import level_info
from cfebm.data.source import Source
from cfebm.data.writer import DatasetWriter, ShardBuffer
from cfebm.redact import redact

SOURCES = ("digits", "shapes", "cifar10", "folder")
NATIVE_CHANNELS = {"digits": 1, "shapes": 3, "cifar10": 3, "folder": 3}


@dataclass
class PrepareConfig:
    """Settings of the ``prepare`` stage (params.yaml section ``prepare``).

    The defaults here are the only defaults; params.yaml and the CLI override them.
    """

    source: str = "digits"
    """Digits | shapes | cifar10 | folder."""
    url: str | None = None
    """Cifar10: archive (or extracted folder); folder: image folder."""
    out: str = "data/prepared"
    """Dataset root to write (local path or fsspec URL)."""
    resolution: int = 16
    """Finest resolution (power of two); images are resized to it."""
    channels: int | None = None
    """1 or 3; None: the source's own (digits 1, others 3)."""
    seed: int = 0
    """Seeds the train/test split (digits, folder) and generation (shapes)."""
    test_fraction: float = 0.2
    """Digits, folder: share of images in the test split."""
    num_train: int = 5000
    """Shapes: number of training scenes."""
    num_test: int = 1000
    """Shapes: number of test scenes."""
    domain: str | None = None
    """Shapes: None, "a" (red-ish objects) or "b" (blue-ish)."""
    folder_labels: bool = False
    """Folder: first-level sub-folder names are class labels."""
    resample: str = "bilinear"
    """PIL filter for resizing: nearest|box|bilinear|bicubic|lanczos."""
    shard_size: int = 4096
    """Images per shard (the unit of reading and of worker sharding)."""
    skip_corrupt: bool = False
    """Folder: skip unreadable images (recorded) instead of failing."""
    storage_options: dict = field(default_factory=dict)
    """Fsspec options for url and out."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"prepare.source must be one of {SOURCES}, got {self.source!r}")
        if self.source in ("cifar10", "folder") and not self.url:
            raise DataError(f"prepare.url is required for source {self.source!r}")
        if not isinstance(self.out, str) or not self.out:
            raise DataError("prepare.out must be a non-empty path or URL")
        layout.check_resolution(self.resolution, "prepare.resolution")
        if self.channels is None:
            self.channels = NATIVE_CHANNELS[self.source]
        if self.channels not in (1, 3):
            raise DataError(f"prepare.channels must be 1, 3 or null, got {self.channels!r}")
        if not 0 <= self.test_fraction < 1:
            raise DataError(f"prepare.test_fraction must be in [0, 1), got {self.test_fraction!r}")
        for name in ("num_train", "num_test", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"prepare.{name} must be an integer >= 0, got {value!r}")
        if self.domain not in (None, "a", "b"):
            raise DataError(f"prepare.domain must be a, b or null, got {self.domain!r}")
        if self.domain is not None and self.source != "shapes":
            raise DataError("prepare.domain applies to source 'shapes' only")
        if self.resample not in RESAMPLE:
            choices = sorted(RESAMPLE)
            raise DataError(f"prepare.resample must be one of {choices}, got {self.resample!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise DataError(f"prepare.shard_size must be an integer >= 1, got {self.shard_size!r}")
        if not isinstance(self.storage_options, dict):
            raise DataError("prepare.storage_options must be a mapping")

    def public(self) -> dict:
        """The settings recorded in the manifest (no storage_options or out; URLs without
        their credentials)."""
        return redact({k: v for k, v in asdict(self).items() if k not in ("storage_options", "out")})


def open_source(config: PrepareConfig) -> Source:
    """The configured source, not yet read (folder and cifar10 are streamed by split)."""
    c = config
    if c.source == "digits":
        from cfebm.data.digits import load_digits_source

        return load_digits_source(c.resolution, c.channels, c.test_fraction, c.seed, c.resample)
    if c.source == "shapes":
        from cfebm.data.shapes import load_shapes_source

        return load_shapes_source(
            c.resolution, c.channels, c.num_train, c.num_test, c.seed, c.domain
        )
    if c.source == "cifar10":
        from cfebm.data.cifar import load_cifar_source

        return load_cifar_source(c.url, c.resolution, c.channels, c.resample, c.storage_options)
    from cfebm.data.folder import load_folder_source

    return load_folder_source(
        c.url,
        c.resolution,
        c.channels,
        c.test_fraction,
        c.seed,
        c.resample,
        c.skip_corrupt,
        c.folder_labels,
        c.storage_options,
    )


def prepare(config: PrepareConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Read the source and write the finest-level dataset root; return its manifest."""
    inputs = [config.url] if config.url else []
    writer = DatasetWriter(config.out, config.storage_options, inputs)  # checked first
    source = open_source(config)
    splits: dict[str, dict] = {}
    has_labels = False
    with writer:
        if progress and writer.stale:
            progress(f"removed {len(writer.stale)} staging folder(s) of an interrupted write")
        for split, batches in source.splits.items():
            buffer = ShardBuffer(writer, split, config.resolution, config.shard_size)
            buffer.add_all(batches)
            counts = buffer.close()
            has_labels = has_labels or buffer.has_labels
            splits[split] = {"count": sum(counts), "shards": len(counts), "shard_counts": counts}
            if progress:
                progress(f"{split}: {sum(counts)} images in {len(counts)} shard(s)")
        if source.errors:
            shown = "\n".join(f"  {e['file']}: {e['reason']}" for e in source.errors[:50])
            more = f"\n  ... and {len(source.errors) - 50} more" if len(source.errors) > 50 else ""
            raise DataError(
                f"{len(source.errors)} file(s) of {config.url} cannot be read (set "
                f"prepare.skip_corrupt: true to leave them out):\n{shown}{more}"
            )
        total = sum(s["count"] for s in splits.values())
        if progress and source.upsampled:
            progress(
                f"note: {source.upsampled} of {total} images are smaller than "
                f"{config.resolution}x{config.resolution} and were upsampled ({config.resample}): "
                "the finest level adds no detail the source does not have"
            )
        if progress and source.ignored:
            progress(f"ignored {len(source.ignored)} file(s) that are not images, e.g. "
                     f"{source.ignored[:3]} (listed in the manifest)")
        if sum(s["count"] for s in splits.values()) == 0:
            detail = f"; {len(source.skipped)} skipped" if source.skipped else ""
            raise DataError(f"source {config.source!r} produced no images{detail}")
        manifest = {
            "format": layout.FORMAT,
            "source": config.public(),
            "channels": config.channels,
            "resolutions": [config.resolution],
            "splits": splits,
            "shard_size": config.shard_size,
            "has_labels": has_labels,
            "label_names": source.label_names,
            "label_fields": source.label_fields,
            "levels": level_info([config.resolution], config.channels),
            "skipped": redact(source.skipped),
            "skipped_count": len(source.skipped),
            "ignored": source.ignored,
            "upsampled": source.upsampled,
        }
        return writer.commit(manifest)
