"""Session fixtures for the uses of the energy: tiny real data sets and trained smoke models.

One digits model (4 -> 8, base width 8) and one shapes a -> b translator (4 -> 8), each
trained once per session in a few seconds on one thread. Test modules import the
fixtures they use (``from fixtures_models import ...``).

Under pytest-xdist every worker process has its own session fixtures; :func:`made_once`
makes the data and the models once for all workers of a run (the first worker that needs
one builds it under a file lock, the others read its files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import CFEBMConfig, from_dict
from cfebm.data import PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare
from cfebm.loop import fit
from cfebm.model import CoarseToFineEBM
from cfebm.trainer import Trainer, model_from_checkpoint
from cfebm.translate import train_translator


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch threads, then restore: the machine is shared, and oversubscribed
    threads make these small convolutions many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def build(root, **prepare_kw) -> str:
    """prepare + pyramid (down to 4x4) of a built-in source under ``root``; the pyramid root."""
    prepared, pyramid = str(root / "prepared"), str(root / "pyramid")
    prepare(PrepareConfig(out=prepared, **prepare_kw))
    build_pyramid(PyramidConfig(input=prepared, out=pyramid, coarsest=4))
    return pyramid


def levels(url: str, split: str = "train") -> dict[int, torch.Tensor]:
    store = PyramidStore(url)
    return {r: torch.from_numpy(np.array(store.read(split, r))) for r in store.resolutions}


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``make(folder)`` filled, made once per test run: shared by
    the pytest-xdist workers (their base folders have one parent), under a file lock."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, done = base / f"made-{name}", base / f"made-{name}.done"
    with FileLock(str(base / f"made-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> str:
    """Digits at 8x8 with its 4x4 level (1,437 train / 360 test images)."""
    made = made_once(tmp_path_factory, "digits", lambda f: build(f, source="digits", resolution=8))
    return str(made / "pyramid")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict[str, str]:
    """Shapes at 8x8, domain a (red-ish objects) and b (blue-ish, same scenes)."""
    kw = dict(source="shapes", resolution=8, num_train=600, num_test=128)

    def make(root: Path) -> None:
        for d in "ab":
            build(root / d, domain=d, **kw)

    root = made_once(tmp_path_factory, "shapes", make)
    return {d: str(root / d / "pyramid") for d in "ab"}


def digits_config() -> CFEBMConfig:
    return from_dict(
        {
            "model": {"channels": 1, "resolutions": [4, 8], "base_width": 8},
            "sampler": {"steps": 10, "step_size": 1.0, "noise_start": 0.015},
            "train": {
                "batch_size": {4: 64},
                "lr": {4: 5e-4},
                "fade_images": 3200,
                "stable_images": 6400,
                "images": {4: 6400},
                "data_noise": 0.03,
                "seed": 0,
            },
        }
    )


@dataclass
class TrainedModel:
    model: CoarseToFineEBM
    cfg: CFEBMConfig
    checkpoint: str


def _trained(folder: Path, cfg: CFEBMConfig) -> TrainedModel:
    path = str(folder / "model.pt")
    return TrainedModel(model_from_checkpoint(load_checkpoint(path)).eval(), cfg, path)


@pytest.fixture(scope="session")
def digits_model(digits_data, tmp_path_factory) -> TrainedModel:
    """The smoke EBM of digits: 250 steps (100 at 4x4, 150 at 8x8), about 10 s."""
    cfg = digits_config()

    def make(folder: Path) -> None:
        with torch_threads(1):
            trainer = Trainer(cfg, levels(digits_data))
            fit(trainer)
        save_checkpoint(trainer.model_state(), str(folder / "model.pt"))

    return _trained(made_once(tmp_path_factory, "digits_model", make), cfg)


def translator_config() -> CFEBMConfig:
    return from_dict(
        {
            "model": {"channels": 3, "resolutions": [4, 8], "base_width": 8},
            "sampler": {"steps": 10, "step_size": 1.0, "noise_start": 0.015},
            "train": {
                "batch_size": {4: 32},
                "lr": {4: 1e-3},
                "fade_images": 2400,
                "stable_images": 4800,
                "images": {4: 4800},
                "seed": 0,
            },
        }
    )


@pytest.fixture(scope="session")
def shapes_translator(shapes_data, tmp_path_factory) -> TrainedModel:
    """The smoke translator shapes a -> b: 375 steps (150 at 4x4, 225 at 8x8), about 10 s."""
    cfg = translator_config()

    def make(folder: Path) -> None:
        with torch_threads(1):
            trainer = train_translator(cfg, levels(shapes_data["b"]), levels(shapes_data["a"]))
        save_checkpoint(trainer.model_state(), str(folder / "model.pt"))

    return _trained(made_once(tmp_path_factory, "translator", make), cfg)
