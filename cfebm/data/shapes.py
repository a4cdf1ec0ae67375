"""Source ``shapes``: procedurally generated RGB scenes of one simple shape each.

Each scene draws one shape (circle, square, triangle, diamond, cross) with random position,
size, rotation jitter and colour on a random background (solid, linear gradient or smooth
noise), drawn 4x supersampled and box-filtered for anti-aliasing. Labels are
(shape, colour). Everything is a function of (seed, split), so the data is reproducible
without downloading anything.

Two domains for image-to-image translation (one-sided translation, paper Sec. 3.4): ``domain="a"``
paints objects in red-ish colours, ``domain="b"`` in blue-ish colours. The random draws do
not depend on the domain, so with the same seed scene i has the same shape, geometry and
background in both domains, and only the object's colour differs: a paired ground truth for
judging unpaired translation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from cfebm.data.errors import DataError
from cfebm.data.images import to_channels
from cfebm.data.source import Batch, Source

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (230, 210, 40),
    "green": (50, 170, 70),
    "cyan": (40, 190, 200),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (230, 80, 160),
}
PALETTES = {
    None: tuple(COLOURS),
    "a": ("red", "orange", "pink"),
    "b": ("blue", "cyan", "purple"),
}
SUPERSAMPLE = 4
BATCH = 256


def load_shapes_source(
    resolution: int,
    channels: int,
    num_train: int,
    num_test: int,
    seed: int,
    domain: str | None,
) -> Source:
    """Train and test scenes; split s of seed s0 uses the random stream ``[s0, s]``."""
    if domain not in PALETTES:
        raise DataError(f"prepare.domain must be a, b or null, got {domain!r}")
    counts = {"train": num_train, "test": num_test}
    splits = {
        name: _batches(n, resolution, channels, [seed, i], domain)
        for i, (name, n) in enumerate(counts.items())
    }
    colour_names = list(COLOURS)
    return Source(
        channels=channels,
        splits=splits,
        label_names=[list(SHAPES), colour_names],
        label_fields=["shape", "colour"],
    )


def _batches(
    n: int, resolution: int, channels: int, seed: list[int], domain: str | None
) -> Iterator[Batch]:
    rng = np.random.default_rng(seed)
    for start in range(0, n, BATCH):
        m = min(BATCH, n - start)
        scenes = [draw_scene(rng, resolution, domain) for _ in range(m)]
        images = np.stack([s[0] for s in scenes]).transpose(0, 3, 1, 2)  # [m, 3, r, r]
        labels = np.array([s[1] for s in scenes], dtype=np.int64)  # [m, 2]
        yield to_channels(np.ascontiguousarray(images), channels), labels


def draw_scene(
    rng: np.random.Generator, resolution: int, domain: str | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """One scene as uint8 [r, r, 3] and its (shape, colour) label.

    The number and order of random draws is fixed (domain-independent), which is what makes
    the two domains paired scene by scene.
    """
    shape = int(rng.integers(len(SHAPES)))
    palette = PALETTES[domain]
    colour_name = palette[min(int(rng.random() * len(palette)), len(palette) - 1)]
    jitter = rng.integers(-20, 21, size=3)
    radius = rng.uniform(0.18, 0.38)
    centre = rng.uniform(radius, 1 - radius, size=2)
    rotation = math.radians(rng.uniform(-15, 15))
    background = _background(rng, resolution * SUPERSAMPLE)

    size = resolution * SUPERSAMPLE
    img = Image.fromarray(background)
    colour = tuple(int(v) for v in np.clip(np.array(COLOURS[colour_name]) + jitter, 0, 255))
    _draw_shape(ImageDraw.Draw(img), SHAPES[shape], centre * size, radius * size, rotation, colour)
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img), (shape, list(COLOURS).index(colour_name))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation background, uint8 [size, size, 3]: solid, gradient or smooth noise."""
    kind = int(rng.integers(3))
    greys = rng.uniform(40, 215, size=(2, 1))
    colours = np.clip(greys + rng.uniform(-25, 25, size=(2, 3)), 0, 255)  # [2, 3]
    angle = rng.uniform(0, 2 * math.pi)
    grid = rng.random((4, 4)).astype(np.float32)
    if kind == 0:
        t = np.zeros((size, size), dtype=np.float64)
    elif kind == 1:
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    else:
        smooth = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        t = np.asarray(smooth)
        t = np.clip(t, 0, 1).astype(np.float64)
    rgb = colours[0] * (1 - t[..., None]) + colours[1] * t[..., None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: np.ndarray,
    radius: float,
    rotation: float,
    colour: tuple[int, int, int],
) -> None:
    cx, cy = float(centre[0]), float(centre[1])
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        return
    if shape == "cross":  # a plus sign: arms of half-width radius/3
        w = radius / 3
        corners = [(w, radius), (w, w), (radius, w), (radius, -w), (w, -w), (w, -radius)]
        outline = corners + [(-x, -y) for x, y in corners]
        points = [(math.hypot(x, y), math.atan2(y, x)) for x, y in outline]
    else:
        sides, start = {"square": (4, math.pi / 4), "triangle": (3, -math.pi / 2)}.get(
            shape,
            (4, 0.0),  # diamond: a square standing on a corner
        )
        points = [(radius, start + 2 * math.pi * k / sides) for k in range(sides)]
    xy = [(cx + r * math.cos(a + rotation), cy + r * math.sin(a + rotation)) for r, a in points]
    draw.polygon(xy, fill=colour)
