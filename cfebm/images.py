"""Image grids and PNG files for people to look at (torchvision's grid layout, Pillow's PNG)."""

from __future__ import annotations

import io

import numpy as np
import torch


def _tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"grids take uint8 images [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    return x


def from_pixels(x: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Images [N, *shape] of integers 0-255 (uint8, as ``pipelines.sample`` writes them, or
    JSON numbers without fractions) as a float tensor in [-1, 1]; anything else is a
    ValueError that names what came instead."""
    x = np.asarray(x)
    want = ", ".join(map(str, shape))
    integral = x.dtype.kind in "iu" or (
        x.dtype.kind == "f" and x.size and np.array_equal(x, np.round(x))
    )
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape) or not integral or x.size == 0:
        got = f"{list(x.shape)} of {x.dtype}" + ("" if integral else " with fractions")
        raise ValueError(
            f"expected images [N, {want}] of integers 0-255 (uint8, as pipelines.sample "
            f"writes them), got {got}"
        )
    if x.min() < 0 or x.max() > 255:
        raise ValueError(f"expected pixel values 0-255, got {x.min()} to {x.max()}")
    return torch.from_numpy(x.astype(np.float32)) / 127.5 - 1.0


def make_grid(
    images: torch.Tensor | np.ndarray, nrow: int | None = None, scale: int = 1
) -> np.ndarray:
    """uint8 images [N, C, H, W] -> one uint8 grid [H', W', 3], ``nrow`` images a row
    (default: a square), each enlarged ``scale`` times (nearest) with a black border.

    The layout is ``torchvision.utils.make_grid``'s (the tests compare the two pixel for
    pixel), computed here because importing torchvision imports ``torch._dynamo``: 3.7 s of
    CPU on top of torch's own import, measured on a 2-core machine without AVX-512, in every
    process that draws a picture (each training stage's driver and rank-0 worker, every CLI)."""
    x = _tensor(images).numpy()
    if scale > 1:
        x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    if x.shape[1] == 1:
        x = x.repeat(3, axis=1)
    n, c, h, w = x.shape
    if n == 1:  # (one image: no border, as torchvision)
        return np.ascontiguousarray(x[0].transpose(1, 2, 0))
    pad = max(1, scale // 2)
    cols = min(nrow or int(np.ceil(np.sqrt(n))), n)
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(x):
        top, left = (i // cols) * (h + pad) + pad, (i % cols) * (w + pad) + pad
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    return grid


def grid_png(images: torch.Tensor | np.ndarray, nrow: int | None = None, scale: int = 1) -> bytes:
    """PNG bytes of :func:`make_grid` (Pillow's writer, as ``torchvision.utils.save_image``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_grid(images, nrow, scale)).save(buf, format="PNG")
    return buf.getvalue()


def write_images(url: str, images, scale: int = 4) -> None:
    """uint8 images [N, C, H, W] as a PNG grid (``url`` ending in ``.png``; each image
    enlarged ``scale`` times) or as a ``.npy`` array."""
    from . import io as cio

    if str(url).endswith(".png"):
        return cio.write_bytes(url, grid_png(images, scale=scale))
    buf = io.BytesIO()
    np.save(buf, images)
    cio.write_bytes(url, buf.getvalue())


def stage_pictures(model, sampler, count: int = 64, seed: int = 0) -> dict[str, bytes]:
    """``samples.png`` (``count`` samples of the model's last stage) and ``chain.png`` (eight
    coarse-to-fine chains, one per row, noise on the left), enlarged to >= 64 pixels."""
    from .sampling import chain_frames, draw

    scale = max(1, 64 // model.resolution())
    frames = chain_frames(model, sampler, seed=seed)  # [chains, T, C, R, R]
    chains, t = frames.shape[:2]
    return {
        "samples.png": grid_png(draw(model, sampler, count, seed=seed), scale=scale),
        "chain.png": grid_png(frames.reshape(chains * t, *frames.shape[2:]), nrow=t, scale=scale),
    }
