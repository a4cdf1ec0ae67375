"""Checkpoints on any fsspec URL (local path, file://, s3://, ...).

A checkpoint is the dict of :meth:`cfebm.trainer.Trainer.state_dict`: every stage's
network, the optimizer state, counters (stage, images seen, steps; beta follows from
them), RNG states, the data order, the replay buffer and the resolved config. A stage's
model file (:meth:`~cfebm.trainer.Trainer.model_state`) holds the networks, config and
counters only. Writes are atomic (:func:`cfebm.io.atomic_open`): a crash mid-write never
leaves a truncated file. Reading never unpickles anything but tensors and plain data.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import torch

from . import io as cio
from .trainer import check_format


class CheckpointError(ValueError):
    """A file that is not a readable cfebm checkpoint; the message names it and why."""


def save_checkpoint(ckpt: dict, url: str) -> None:
    """Write ``ckpt`` to ``url`` atomically."""
    check_format(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    cio.write_bytes(url, buf.getvalue())


def _why_unreadable(error: Exception) -> str:
    if isinstance(error, pickle.UnpicklingError):
        # torch's own message suggests an unsafe load; a file we did not recognise never
        # gets that advice from us.
        return "it holds Python objects other than tensors and plain data (not unpickled)"
    if isinstance(error, (zipfile.BadZipFile, RuntimeError)) or "zip" in str(error).lower():
        return "not a PyTorch file, or a truncated one"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def load_checkpoint(url: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError (a ValueError)
    naming the file if it is not one, FileNotFoundError if there is none."""
    if cio.is_local(url) and cio.isdir(url):
        raise CheckpointError(
            f"{url} is a folder, not a checkpoint file (a stage's model is e.g. "
            "models/stage2/model.pt)"
        )
    data = cio.read_bytes(url)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{url} is not a readable cfebm checkpoint: {_why_unreadable(e)}"
        ) from None
    try:
        check_format(ckpt)
    except ValueError as e:
        raise CheckpointError(f"{url}: {e}") from None
    return ckpt


TRAINER_FILE = "trainer.pt"
"""A data-parallel checkpoint folder: ``trainer.pt`` (rank 0: the trainer state and the
world size) and ``rank<r>.pt`` (every rank: its own data order, RNG and replay buffer)."""


RANK_STATE = ("batches", "source_batches", "rng", "replay", "bank")
"""What each data-parallel rank has of its own: its data order, random streams, replay
buffer and bank of coarse chains (the rest, weights and optimiser, is the same on all)."""


def save_worker_checkpoint(folder: str, state: dict, rank: int, world_size: int) -> None:
    """This rank's part of a data-parallel checkpoint in ``folder`` (local)."""
    if rank == 0:
        save_checkpoint({**state, "world_size": world_size}, os.path.join(folder, TRAINER_FILE))
    own = {k: state[k] for k in RANK_STATE}
    torch.save(own, os.path.join(folder, f"rank{rank}.pt"))


def load_worker_checkpoint(folder: str, rank: int, world_size: int) -> tuple[dict, bool]:
    """(the checkpoint for ``rank``, exact): with the same world size every rank gets its
    own data order and RNG back (exact); otherwise rank 0's (the caller reshuffles)."""
    ckpt = load_checkpoint(os.path.join(folder, TRAINER_FILE))
    own = os.path.join(folder, f"rank{rank}.pt")
    exact = ckpt.pop("world_size", None) == world_size and os.path.exists(own)
    if exact:
        ckpt.update(torch.load(own, map_location="cpu", weights_only=True))
    return ckpt, exact
