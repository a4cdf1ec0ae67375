"""The on-disk contract of a dataset root (format ``cfebm-pyramid/1``).

A root (local directory or object-store prefix) holds::

    manifest.json                          written last: its presence means complete
    <split>/r<res>/images-<k:05d>.npy      NCHW shard k of a split at resolution res
    <split>/labels-<k:05d>.npy             int64 [n] or [n, L] labels of shard k

The finest level is uint8 in [0, 255]; coarser levels are float32 exact 2x2 mean pools in
the same [0, 255] scale. Shard k holds the same images, in the same order, at every level.
"""

from __future__ import annotations

from cfebm.data.errors import DataError

FORMAT = "cfebm-pyramid/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
FINEST_DTYPE = "uint8"
COARSE_DTYPE = "float32"


def images_path(split: str, resolution: int, shard: int) -> str:
    """Relative path of image shard ``shard`` of ``split`` at ``resolution``."""
    return f"{split}/r{resolution}/images-{shard:05d}.npy"


def labels_path(split: str, shard: int) -> str:
    """Relative path of the labels of shard ``shard`` of ``split``."""
    return f"{split}/labels-{shard:05d}.npy"


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def check_resolution(value: int, name: str) -> None:
    """Raise a DataError naming parameter ``name`` unless ``value`` is a power of two >= 2."""
    if not is_power_of_two(value) or value < 2:
        raise DataError(f"{name} must be a power of two >= 2, got {value!r}")


def pyramid_resolutions(finest: int, coarsest: int) -> list[int]:
    """Resolutions from ``coarsest`` to ``finest``, each twice the previous (the stages)."""
    check_resolution(finest, "finest resolution")
    check_resolution(coarsest, "pyramid.coarsest")
    if coarsest > finest:
        raise DataError(f"pyramid.coarsest ({coarsest}) is finer than the finest ({finest})")
    resolutions = [finest]
    while resolutions[-1] > coarsest:
        resolutions.append(resolutions[-1] // 2)
    return resolutions[::-1]


def level_dtype(resolution: int, finest: int) -> str:
    return FINEST_DTYPE if resolution == finest else COARSE_DTYPE
