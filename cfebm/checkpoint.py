"""Checkpoints on any fsspec URL (local path, file://, s3://, ...).

A checkpoint is the dict of :meth:`cfebm.trainer.Trainer.state_dict`: every stage's
weights, optimizer state, counters (stage, images seen, steps; beta follows from them),
RNG states, the data order, and the resolved config. Writes are atomic
(:func:`cfebm.io.atomic_open`): a crash mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import io

import torch

from . import io as cio
from .trainer import check_format


def save_checkpoint(ckpt: dict, url: str) -> None:
    """Write ``ckpt`` to ``url`` atomically."""
    check_format(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    cio.write_bytes(url, buf.getvalue())


def load_checkpoint(url: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error if it is not one."""
    data = cio.read_bytes(url)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # pickle/zip errors: name the file, not the internals
        raise ValueError(
            f"{url} is not a readable cfebm checkpoint ({type(e).__name__}: {e})"
        ) from e
    try:
        check_format(ckpt)
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None
    return ckpt
