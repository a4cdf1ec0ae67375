"""MLflow models of the stages: log, register, load by URI, serve.

Every training stage logs its model as an MLflow pyfunc model (:class:`EnergyModel`, with
a tensor signature and the cfebm config) and the last stage registers it, a new version
per run; ``models:/<name>@latest`` is the newest. ``mlflow models serve -m
models:/cfebm-digits@latest --env-manager local`` then answers POST /invocations with
``{"inputs": <uint8 images [N, C, r, r]>}`` by one energy per image.
"""

from __future__ import annotations

import os

import mlflow
import torch

from cfebm.checkpoint import load_checkpoint
from cfebm.trainer import model_from_checkpoint
from pipelines import tracking


class EnergyModel(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc model of a stage: images [N, C, r, r] of integers 0-255 (as
    ``pipelines.sample`` writes them) -> one energy per image (lower: more likely under the
    model; higher: the out-of-distribution score). Loaded by MLflow from the logged model's
    ``model.pt`` artifact; wrong shapes or dtypes are an error that names them (HTTP 400
    when served)."""

    def load_context(self, context) -> None:
        from cfebm.frozen import FrozenEnergy

        ckpt = load_checkpoint(context.artifacts["model"])
        model = model_from_checkpoint(ckpt)
        self.energy = FrozenEnergy(model.current)
        self.shape = (model.cfg.channels, model.resolution(), model.resolution())

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        from cfebm.images import from_pixels

        if isinstance(model_input, dict):  # the named tensor of the signature
            model_input = model_input.get("images", next(iter(model_input.values()), None))
        try:
            x = from_pixels(model_input, self.shape)
        except ValueError as e:
            raise MlflowException(str(e), INVALID_PARAMETER_VALUE) from None
        with torch.no_grad():
            return self.energy(x).numpy().astype("float32")


def log_model(run_id: str, tracking_uri: str, model_path: str, registered_name: str | None) -> str:
    """Log the model file at ``model_path`` as an MLflow pyfunc model of run ``run_id``
    (with its signature and cfebm config); register it as a new version of
    ``registered_name`` when given. Returns the model's URI (``models:/<model id>``; also
    ``runs:/<run id>/model``)."""
    import numpy as np
    import yaml
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    ckpt = load_checkpoint(model_path)
    cfg = ckpt["config"]["model"]
    r = cfg["resolutions"][int(ckpt["stage"])]
    signature = ModelSignature(
        # float64: JSON numbers arrive as they are, so that fractions are refused rather
        # than cast to uint8 (predict checks for integers 0-255)
        inputs=Schema([TensorSpec(np.dtype(np.float64), (-1, cfg["channels"], r, r), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), "energy")]),
    )
    client = mlflow.MlflowClient(tracking_uri)
    # The fluent run context ends the run (FINISHED): this is the stage's last MLflow step.
    import cfebm
    import pipelines

    code = [os.path.dirname(cfebm.__file__), os.path.dirname(pipelines.__file__)]
    with tracking.fluent_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=EnergyModel(),
            artifacts={"model": model_path},
            code_paths=code,  # the model loads with the code it was trained with
            signature=signature,
            metadata={"cfebm_config": yaml.safe_dump(ckpt["config"]), "stage": int(ckpt["stage"])},
            pip_requirements=[],
        )
        if registered_name:
            version = mlflow.register_model(info.model_uri, registered_name)
            client.set_model_version_tag(
                registered_name, version.version, "cfebm.stage", str(ckpt["stage"])
            )
    return info.model_uri
