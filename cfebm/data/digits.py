"""Source ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, labels 0-9).

Small and always available offline, so it is the default source for smoke runs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cfebm.data.images import resample_filter, to_channels
from cfebm.data.source import Source, split_permutation


def load_digits_source(
    resolution: int, channels: int, test_fraction: float, seed: int, resample: str
) -> Source:
    """Digits scaled from 0..16 to 0..255 and resized (PIL, in float) to ``resolution``."""
    from sklearn.datasets import load_digits  # only this source needs scikit-learn

    bunch = load_digits()
    raw = bunch.images.astype(np.float32) * (255.0 / 16.0)  # [N, 8, 8]
    filt = resample_filter(resample)
    size = (resolution, resolution)
    # Resizing the float image and rounding once keeps the 0..16 -> 0..255 scale exact.
    images = np.stack([np.asarray(Image.fromarray(x, mode="F").resize(size, filt)) for x in raw])
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)[:, None]  # [N, 1, r, r]
    images = to_channels(images, channels)
    labels = bunch.target.astype(np.int64)
    train, test = split_permutation(len(images), test_fraction, seed)
    return Source(
        channels=channels,
        splits={"train": [(images[train], labels[train])], "test": [(images[test], labels[test])]},
        label_names=[str(d) for d in range(10)],
        upsampled=len(images) if resolution > raw.shape[-1] else 0,
    )
