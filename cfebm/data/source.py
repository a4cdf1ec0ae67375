"""What every source produces: per-split batches of uint8 NCHW images and int64 labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

Batch = tuple[np.ndarray, "np.ndarray | None"]  # uint8 [n, C, r, r], int64 [n] / [n, L] / None


@dataclass
class Source:
    """A dataset at its finest resolution, split by split.

    ``splits`` maps split name to an iterable of batches, consumed once and lazily (a large
    folder is streamed, never held in memory). ``skipped`` fills up while iterating with
    ``{"file", "reason"}`` for inputs skipped under ``skip_corrupt``.
    """

    channels: int
    splits: dict[str, Iterable[Batch]]
    label_names: list | None = None
    label_fields: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    """Unreadable inputs without ``skip_corrupt``: the stage fails naming all of them."""
    ignored: list[str] = field(default_factory=list)
    """Files that are not images (a folder's README), left out and listed."""
    upsampled: int = 0
    """Images smaller than the resolution, and so upsampled."""


def split_permutation(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, test) index arrays: a seeded permutation, test first.

    Both keep the permuted order, so every shard mixes classes whatever the input order.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    return order[n_test:], order[:n_test]
