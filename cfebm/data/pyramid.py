"""Mean-pooling pyramids: the data of stage s-1 is stage s's data pooled 2x2 (paper Sec. 3.1).

``build_pyramid`` reads a prepared dataset (finest level only) and writes a new root with
every level down to ``coarsest``, one shard at a time, so memory is bounded by one shard
whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from cfebm.data import layout
from cfebm.data.errors import DataError
from cfebm.data.store import PyramidStore
from cfebm.redact import redact
from cfebm.data.writer import DatasetWriter


def mean_pool2x(a: np.ndarray) -> np.ndarray:
    """Exact 2x2 mean pooling over the last two axes: [..., H, W] -> float32 [..., H/2, W/2].

    Why float32 and not uint8: uint8 would round every level. Why float32 is exact: pooling
    k times turns integers in [0, 255] into multiples of 4**-k, whose partial sums need at
    most 10 + 2k significant bits, within float32's 24 for k <= 7 (512 -> 4). Floats that
    did not come from such data are pooled to float32 rounding.
    """
    if a.ndim < 2 or a.shape[-1] % 2 or a.shape[-2] % 2:
        raise DataError(f"mean_pool2x needs even height and width, got shape {a.shape}")
    out = a[..., 0::2, 0::2].astype(np.float32)
    out += a[..., 0::2, 1::2]
    out += a[..., 1::2, 0::2]
    out += a[..., 1::2, 1::2]
    out *= 0.25
    return out


def pool_levels(images: np.ndarray, resolutions: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (resolution, images) from the finest of ``resolutions`` (``images`` itself) down."""
    level = images
    for r in sorted(resolutions, reverse=True):
        if level.shape[-1] != r:
            level = mean_pool2x(level)
        if level.shape[-2:] != (r, r):
            raise DataError(f"images of shape {images.shape} cannot be pooled to {r}x{r}")
        yield r, level


@dataclass
class PyramidConfig:
    """Settings of the ``pyramid`` stage (params.yaml section ``pyramid``)."""

    input: str = "data/prepared"
    """A prepared dataset root (local path or fsspec URL)."""
    out: str = "data/pyramid"
    """Where the pyramid root goes (local path or fsspec URL)."""
    coarsest: int = 4
    """Coarsest resolution, a power of two <= the prepared resolution."""
    storage_options: dict = field(default_factory=dict)
    """Fsspec options for input and out."""

    def __post_init__(self) -> None:
        for name in ("input", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataError(f"pyramid.{name} must be a non-empty path or URL")
        layout.check_resolution(self.coarsest, "pyramid.coarsest")
        if not isinstance(self.storage_options, dict):
            raise DataError("pyramid.storage_options must be a mapping")

    def public(self) -> dict:
        """The settings without storage_options (which may hold credentials), URLs
        redacted."""
        return redact({k: v for k, v in asdict(self).items() if k != "storage_options"})


def build_pyramid(config: PyramidConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Write the pyramid of ``config.input`` to ``config.out``; return the new manifest."""
    writer = DatasetWriter(config.out, config.storage_options, [config.input])  # checked first
    source = PyramidStore(config.input, config.storage_options)
    finest = source.resolutions[-1]
    if source.dtype(finest) != np.uint8:
        found = source.dtype(finest)
        raise DataError(f"{config.input}: the finest level must be uint8, not {found}")
    if config.coarsest > finest:
        raise DataError(
            f"pyramid.coarsest ({config.coarsest}) is finer than the prepared resolution "
            f"{finest} of {config.input}"
        )
    resolutions = layout.pyramid_resolutions(finest, config.coarsest)
    with writer:
        if progress and writer.stale:
            progress(f"removed {len(writer.stale)} staging folder(s) of an interrupted write")
        for split in source.splits:
            for k in range(source.num_shards(split)):
                images = source.read_shard(split, finest, k)  # uint8 [n, C, finest, finest]
                for r, level in pool_levels(images, resolutions):
                    writer.write_array(layout.images_path(split, r, k), level)
                if source.has_labels:
                    writer.write_array(layout.labels_path(split, k), source.labels(split, [k]))
                if progress:
                    progress(f"{split} shard {k + 1}/{source.num_shards(split)}")
        manifest = {
            **{k: v for k, v in source.manifest.items() if k != "files"},
            "resolutions": resolutions,
            "levels": level_info(resolutions, source.channels),
            "pyramid": config.public(),
        }
        return writer.commit(manifest)


def level_info(resolutions: list[int], channels: int) -> dict:
    """The manifest's ``levels`` entry: dtype and image shape per resolution (finest first)."""
    finest = max(resolutions)
    return {
        str(r): {"dtype": layout.level_dtype(r, finest), "shape": [channels, r, r]}
        for r in sorted(resolutions, reverse=True)
    }
