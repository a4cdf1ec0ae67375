"""Image grids and files for people to look at."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def make_grid(
    images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 1
) -> np.ndarray:
    """uint8 images [N, C, H, W] -> one uint8 grid [H', W', C] (C = 1 or 3), rows of ``nrow``."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"make_grid takes uint8 images, got {a.dtype}")
    n, c, h, w = a.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        y, x = divmod(i, nrow)
        top, left = pad + y * (h + pad), pad + x * (w + pad)
        grid[top : top + h, left : left + w] = a[i].transpose(1, 2, 0)
    return grid


def grid_png(images: torch.Tensor | np.ndarray, nrow: int | None = None, scale: int = 1) -> bytes:
    """PNG bytes of :func:`make_grid`, optionally enlarged ``scale`` times (nearest)."""
    g = make_grid(images, nrow)
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
