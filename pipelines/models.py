"""Models by name: local paths, fsspec URLs, and MLflow's ``runs:/`` and ``models:/`` URIs.

Every command that takes a model (sample, evaluate, restore, ood, translate) resolves it
through :func:`load_model`, so each accepts ``models/stage2/model.pt``,
``s3://bucket/model.pt``, ``runs:/<run id>/model`` and ``models:/cfebm-digits@latest``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from cfebm.checkpoint import load_checkpoint
from cfebm.config import ConfigError
from cfebm.data import PyramidStore
from cfebm.device import resolve
from cfebm.model import CoarseToFineEBM
from cfebm.trainer import model_from_checkpoint
from pipelines.tracking import TrackingOptions

MODEL_FILE = "model.pt"
MLFLOW_SCHEMES = ("runs:/", "models:/")


@dataclass
class Runtime:
    """Where a stage of the energy's uses runs and logs."""

    device: str = "auto"
    """cpu, cuda, cuda:1, or auto (cuda when available)."""
    threads: int | None = None
    """torch CPU threads; null: torch's default (all cores)."""
    mlflow: TrackingOptions = field(default_factory=TrackingOptions)

    def setup(self) -> torch.device:
        """Apply the thread count; the torch device."""
        return resolve(self.device, self.threads)


@dataclass
class HeldOutStage(Runtime):
    """A stage that puts a trained energy to use on held-out images (restore, ood)."""

    model: str = "models/stage2/model.pt"
    """The trained model (path, URL, ``runs:/`` or ``models:/`` URI)."""
    data: str = "data/pyramid"
    """Pyramid dataset root of the held-out (in-distribution) images."""
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    """Held-out split (in ood also the split read from the ``other`` data sets)."""
    stage: int | None = None
    """Stage whose resolution and energies are used; null: the model's finest."""
    grid_images: int = 16
    """Images of each row of the PNG grids."""

    def open(self) -> tuple[CoarseToFineEBM, PyramidStore, int, torch.device]:
        """(the model, checked against the dataset; the dataset; the stage used; the
        device), after :meth:`Runtime.setup`."""
        from cfebm.evaluate import check_data

        device = self.setup()
        model, _ = load_model(self.model, device, self.stage)
        store = PyramidStore(self.data, self.data_storage_options)
        check_data(model, store, self.model)
        return model, store, model.stage if self.stage is None else self.stage, device


def local_model(uri: str) -> str:
    """A path or fsspec URL of the model file named by ``uri``; MLflow URIs are downloaded
    (once per URI, into MLflow's cache) and point at the model file they hold."""
    if not str(uri).startswith(MLFLOW_SCHEMES):
        return uri
    import mlflow

    from pipelines.tracking import fluent_uri, resolve_tracking_uri

    try:
        with fluent_uri(resolve_tracking_uri()):
            path = mlflow.artifacts.download_artifacts(uri)
    except Exception as e:
        raise ConfigError(
            f"cannot fetch the model {uri} from MLflow: {str(e).splitlines()[0]}"
        ) from None
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            if MODEL_FILE in files:
                return os.path.join(root, MODEL_FILE)
        raise ConfigError(f"{uri} holds no cfebm {MODEL_FILE}")
    return path


def load_model(
    uri: str, device: torch.device, stage: int | None = None
) -> tuple[CoarseToFineEBM, dict]:
    """(the trained model named by ``uri``, its checkpoint); ``stage`` must be one it has."""
    ckpt = load_checkpoint(local_model(uri), map_location=device)
    model = model_from_checkpoint(ckpt, device)
    if stage is not None and not 0 <= stage <= model.stage:
        raise ConfigError(f"stage {stage}: {uri} has stages 0..{model.stage}")
    return model, ckpt
