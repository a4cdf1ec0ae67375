"""MLflow for the pipeline stages: one parent run per pipeline run, a nested run per stage.

A *pipeline run* is one ``dvc repro``. DVC starts every stage as its own process, so the
stages find their shared parent run through a small state file
(``runs/mlflow-pipeline.json``) and the identity of the ``dvc`` process they run under
(:func:`invocation_id`). The parent is RUNNING while a stage runs and FINISHED (FAILED if
a stage failed) once they have ended. A ``dvc repro`` that was killed leaves its stage
open, so the next ``dvc repro`` continues that pipeline run, and the stage it resumes
continues the same nested run. An orchestrator can set ``CFEBM_MLFLOW_PARENT_RUN_ID`` to
nest the stages under a run of its own, or ``CFEBM_PIPELINE_ID`` to group stages that it
starts itself.

Only the driver and the rank-0 worker talk to MLflow; the library (cfebm) never does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_ENV = "CFEBM_MLFLOW_PARENT_RUN_ID"
PIPELINE_ENV = "CFEBM_PIPELINE_ID"
STATE_FILE = os.path.join("runs", "mlflow-pipeline.json")


def resolve_tracking_uri(param: str | None, project_dir: str = ".") -> str:
    """``param``, else ``MLFLOW_TRACKING_URI``, else the embedded store ``sqlite:///mlflow.db``.

    Relative local stores are made absolute against ``project_dir``: the workers run in
    other folders, and must write to the same database as ``make ui`` reads.
    """
    uri = param or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.join(project_dir, uri[len("sqlite:///") :]))
    if uri.startswith("file://") or "://" not in uri:
        return os.path.abspath(os.path.join(project_dir, uri.removeprefix("file://")))
    return uri


def local_artifact_root(tracking_uri: str) -> str | None:
    """``<folder of the database>/mlruns`` for a local sqlite store (None otherwise)."""
    if tracking_uri.startswith("sqlite:////"):
        db = tracking_uri[len("sqlite:///") :]
        return "file://" + os.path.join(os.path.dirname(db), "mlruns")
    return None


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested settings -> {"a.b.c": "value"} for MLflow params.

    Tables keyed by resolution (batch sizes, learning rates) stay one JSON value.
    """
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not all(isinstance(x, int) for x in v):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (list, tuple, dict)):
            out[key] = json.dumps({str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
        else:
            out[key] = str(v)
    return out


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(c, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created on first use."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=local_artifact_root(tracking_uri))
    except Exception:  # created meanwhile by another stage or worker
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def invocation_id() -> str | None:
    """Which ``dvc repro`` (or ``dvc exp run``) this stage runs under: ``CFEBM_PIPELINE_ID``
    if set, else the pid and start time of the nearest ``dvc`` ancestor process (Linux
    /proc); None for a stage started by hand."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    pid = os.getppid()
    for _ in range(8):  # dvc -> (shell) -> python -m pipelines.<stage>
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if _is_dvc(argv):
            return f"dvc-{pid}-{fields[19]}"  # field 22 of stat: start time
        pid = int(fields[1])  # field 4: parent pid
        if pid <= 1:
            return None
    return None


def _is_dvc(argv: list[str]) -> bool:
    """``dvc ...``, ``python .../bin/dvc ...`` (the console script) or ``python -m dvc``."""
    if not argv:
        return False
    exe = os.path.basename(argv[0])
    if exe == "dvc":
        return True
    return exe.startswith("python") and (
        (len(argv) > 1 and os.path.basename(argv[1]) == "dvc") or argv[1:3] == ["-m", "dvc"]
    )


class PipelineRuns:
    """The parent run of the current pipeline run and the nested runs of its stages.

    A pipeline run is one ``dvc repro``: the stages it runs share one parent run, which
    is RUNNING while one of them runs and FINISHED (or FAILED) once they have ended. A
    ``dvc repro`` that was killed leaves a stage open; the next one then continues that
    pipeline run (and the stage's nested run, when it resumes the same stage) instead of
    starting a new one.
    """

    def __init__(self, tracking_uri: str, experiment: str, state_path: str = STATE_FILE):
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)
        self.experiment_id = experiment_id(self.client, experiment, tracking_uri)
        self.state_path = state_path
        self.external_parent = os.environ.get(PARENT_ENV)
        self.invocation = invocation_id()

    def _load(self) -> dict:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        same_store = state.get("tracking_uri") == self.tracking_uri
        same_exp = state.get("experiment_id") == self.experiment_id
        return state if same_store and same_exp else {}

    def _save(self, state: dict) -> None:
        os.makedirs(os.path.dirname(self.state_path) or ".", exist_ok=True)
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, self.state_path)

    def _status(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id).info.status
        except Exception:
            return None

    def parent(self) -> str:
        """This pipeline run's parent run: the one of the same ``dvc repro``, or of an
        interrupted one, reopened if need be; else a new one."""
        if self.external_parent:
            return self.external_parent
        state = self._load()
        prev = state.get("parent_run_id")
        same = self.invocation is not None and state.get("invocation") == self.invocation
        interrupted = bool(state.get("open"))
        if prev and (same or interrupted) and self._status(prev) is not None:
            if self._status(prev) != "RUNNING":
                self.client.update_run(prev, status="RUNNING")
            state["invocation"] = self.invocation
            self._save(state)
            return prev
        run = self.client.create_run(
            self.experiment_id,
            run_name=time.strftime("pipeline-%Y%m%d-%H%M%S"),
            tags={"cfebm.kind": "pipeline"},
        )
        self._save(
            {
                "tracking_uri": self.tracking_uri,
                "experiment_id": self.experiment_id,
                "parent_run_id": run.info.run_id,
                "invocation": self.invocation,
                "open": {},
                "stages": {},
            }
        )
        return run.info.run_id

    def stage(
        self, parent_id: str, key: str, run_name: str, params: Mapping[str, Any], tags: Mapping
    ) -> tuple[str, bool]:
        """``(run_id, continued)``: the stage's nested run, continued if a killed attempt of
        the same stage (same ``key``) left it RUNNING under this parent."""
        state = self._load() if not self.external_parent else {}
        known = state.get("stages", {}).get(key)
        continued = bool(known) and self._status(known) == "RUNNING"
        if continued:
            run_id = known
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={"mlflow.parentRunId": parent_id, "cfebm.kind": "stage", **tags},
            )
            run_id = run.info.run_id
            self.log_params(run_id, params)
        if state:
            state.setdefault("stages", {})[key] = run_id
            state.setdefault("open", {})[run_id] = self.invocation
            self._save(state)
        return run_id, continued

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def end_stage(self, run_id: str, status: str = "FINISHED") -> None:
        """End a stage's run; the parent ends with the last open stage (FAILED if one did).
        Stage runs left open by a killed ``dvc repro`` and not resumed end as KILLED."""
        self.client.set_terminated(run_id, status)
        state = self._load()
        if self.external_parent or not state:
            return
        state.setdefault("open", {}).pop(run_id, None)
        for stale, inv in list(state["open"].items()):
            if inv != self.invocation or self.invocation is None:
                self.client.set_terminated(stale, "KILLED")
                del state["open"][stale]
        if status == "FAILED":
            state["failed"] = True
        if not state["open"]:
            parent = state["parent_run_id"]
            self.client.set_terminated(parent, "FAILED" if state.get("failed") else "FINISHED")
        self._save(state)

    def end_pipeline(self, parent_id: str, status: str = "FINISHED") -> None:
        """End the parent run now (unless an orchestrator owns it); a later stage of the
        same ``dvc repro`` reopens it."""
        if self.external_parent:
            return
        self.client.set_terminated(parent_id, status)


class RunLogger:
    """Buffered metrics and images for one run, from the rank-0 worker or the driver.

    Metrics are sent in batches (every ``flush_every_s`` seconds), so logging every step
    costs nothing noticeable. A tracking server that fails does not stop training: the
    error is reported once and logging goes on.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 5.0):
        self.client = client(tracking_uri)
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._warned = False

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:
            if not self._warned:
                print(f"warning: MLflow {what} failed ({type(e).__name__}: {e}); training goes on")
                self._warned = True

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, int(step)) for k, v in values.items())
        if time.monotonic() - self._last_flush >= self.flush_every_s or len(self._buffer) > 900:
            self.flush()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        for i in range(0, len(buffer), 1000):
            self._guard("metrics", self.client.log_batch, self.run_id, metrics=buffer[i : i + 1000])

    def image(self, grid: np.ndarray, key: str, step: int) -> None:
        """A uint8 grid [H, W, C] as an image with a step (the UI shows a slider)."""
        from PIL import Image

        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        self._guard("image", self.client.log_image, self.run_id, img, key=key, step=int(step))

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._guard("artifact", self.client.log_artifact, self.run_id, path, artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        self._guard("text", self.client.log_text, self.run_id, text, artifact_file)

    def png(self, data: bytes, artifact_file: str) -> None:
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        self._guard("image", self.client.log_image, self.run_id, img, artifact_file=artifact_file)
