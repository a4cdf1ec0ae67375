"""Small image conversions shared by the sources: channels, centre crop, resize."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cfebm.data.errors import DataError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# ITU-R 601-2 luma, the weights PIL's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def resample_filter(name: str) -> Image.Resampling:
    if name not in RESAMPLE:
        raise DataError(f"prepare.resample must be one of {sorted(RESAMPLE)}, got {name!r}")
    return RESAMPLE[name]


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N, C, H, W] with C in {1, 3} converted to ``channels`` (luma or repetition)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 3 and channels == 1:
        luma = np.tensordot(_LUMA, images.astype(np.float64), axes=([0], [1]))  # [N, H, W]
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, None]
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def centre_square(img: Image.Image) -> Image.Image:
    """The largest centred square of ``img`` (so resizing never distorts the aspect)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)) if (w, h) != (s, s) else img


def resize_batch(images: np.ndarray, resolution: int, resample: str) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [N, C, r, r] through PIL (each image centre-cropped)."""
    n, c, h, w = images.shape
    if (h, w) == (resolution, resolution):
        return images
    filt = resample_filter(resample)
    out = np.empty((n, c, resolution, resolution), dtype=np.uint8)
    for i in range(n):
        for j in range(c):
            img = centre_square(Image.fromarray(images[i, j], mode="L"))
            out[i, j] = np.asarray(img.resize((resolution, resolution), filt))
    return out
