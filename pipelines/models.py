"""Models by name: local paths, fsspec URLs, and MLflow's ``runs:/`` and ``models:/`` URIs.

Every command that takes a model (sample, evaluate, restore, ood, translate) resolves it
through :func:`load_model`, so each accepts ``models/stage2/model.pt``,
``s3://bucket/model.pt``, ``runs:/<run id>/model`` and ``models:/cfebm-digits@latest``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from cfebm.checkpoint import load_checkpoint
from cfebm.config import ConfigError
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
        if self.threads is not None:
            if self.threads < 1:
                raise ConfigError(f"threads must be >= 1 or null, got {self.threads}")
            torch.set_num_threads(self.threads)
        return torch_device(self.device)


def torch_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_model(uri: str) -> str:
    """A path or fsspec URL of the model file named by ``uri``; MLflow URIs are downloaded
    (once per URI, into MLflow's cache) and point at the model file they hold."""
    if not str(uri).startswith(MLFLOW_SCHEMES):
        return uri
    import mlflow

    from pipelines.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    try:
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
