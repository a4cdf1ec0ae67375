"""MLflow for the stages: one parent run per pipeline run, one nested run per stage.

A *pipeline run* is one invocation that runs stages: ``dvc repro``, ``dvc exp run`` (in the
workspace, ``--temp`` or queued), ``make run`` or ``make submit``. Its stages are separate
processes; they find their shared parent run by the tag ``cfebm.pipeline`` = the
invocation's key (:func:`invocation_key`): ``CFEBM_PIPELINE_ID`` when an orchestrator sets
it, else the DVC experiment's name, else the ``dvc`` process that DVC records in its lock
file as running the stage. The first stage creates the parent; every stage, when it ends,
sets the parent's status and end time (FAILED once any stage failed) without ever setting
a finished run back to running. ``CFEBM_MLFLOW_PARENT_RUN_ID`` nests the stages under a run
that an orchestrator owns (and ends) itself.

The parent run also gathers its stages' parameters (named as in params.yaml) and final
results (``<stage run>/<metric>``, e.g. ``evaluate/stage_1/fid_cfebm-digits-cnn``), so
that comparing two pipeline runs in MLflow's UI shows what changed and what it gave.

A stage killed mid-run leaves its run RUNNING; the next attempt of the same stage (same
``cfebm.stage_key``) continues that run, under its parent, and so does the rest of that
invocation's pipeline. Stores: a relative local store (``sqlite:///mlflow.db``, the
default) is the project's, even when DVC runs the stage in a temporary copy (DVC sets
``DVC_ROOT`` to the project). Only drivers and the rank-0 worker talk to MLflow; cfebm
never does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cfebm.redact import flatten, public, redact

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_ENV = "CFEBM_MLFLOW_PARENT_RUN_ID"
PIPELINE_ENV = "CFEBM_PIPELINE_ID"
PIPELINE_TAG = "cfebm.pipeline"
STAGE_KEY_TAG = "cfebm.stage_key"
KIND_TAG = "cfebm.kind"
PER_STAGE_PARAMS = {"stage", "ray_run", "variant"}
"""Parameters that differ between the stages of one pipeline run by construction."""
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tags MLflow's UI reads to open the experiment on its training runs."""


@dataclass
class TrackingOptions:
    """Where and what a stage logs to MLflow."""

    enabled: bool = True
    """Log the stage (a nested run of the pipeline run)."""
    tracking_uri: str | None = None
    """null: ``MLFLOW_TRACKING_URI``, else the project's ``sqlite:///mlflow.db`` (make ui)."""
    experiment: str = "cfebm"
    system_metrics: bool = False
    """Log CPU, memory (and GPU) use of the run's process every 10 s (MLflow system
    metrics)."""


def project_root() -> str:
    """The DVC project the stage belongs to (``DVC_ROOT``, set by DVC even for temporary
    experiment copies), else the working directory."""
    return os.environ.get("DVC_ROOT") or os.getcwd()


def resolve_tracking_uri(param: str | None = None) -> str:
    """``param``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; relative local
    stores made absolute against :func:`project_root` (workers run elsewhere)."""
    uri = param or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    root = project_root()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.join(root, uri[len("sqlite:///") :]))
    if uri.startswith("file://") or "://" not in uri:
        return os.path.abspath(os.path.join(root, uri.removeprefix("file://")))
    return uri


def local_artifact_root(tracking_uri: str) -> str | None:
    """``<folder of the database>/mlruns`` for a local sqlite store (None otherwise)."""
    if tracking_uri.startswith("sqlite:////"):
        return "file://" + os.path.join(
            os.path.dirname(tracking_uri[len("sqlite:///") :]), "mlruns"
        )
    return None


def _dvc_process_key() -> str | None:
    """The ``dvc`` process that runs this stage, as DVC's lock file records it, with its
    start time (pids are reused): ``dvc:<pid>:<start>``."""
    import psutil

    root = os.getcwd()
    while not os.path.isdir(os.path.join(root, ".dvc")):
        parent = os.path.dirname(root)
        if parent == root:
            return None
        root = parent
    try:
        with open(os.path.join(root, ".dvc", "tmp", "rwlock")) as f:
            lock = json.load(f)
        pids = {int(i["pid"]) for i in lock.get("write", {}).values()}
        ancestors = {p.pid: p for p in psutil.Process().parents()}
    except (OSError, ValueError, KeyError, psutil.Error):
        return None
    for pid in sorted(pids & set(ancestors)):
        return f"dvc:{pid}:{ancestors[pid].create_time():.3f}"
    return None


def invocation_key() -> str | None:
    """Which pipeline run this process belongs to (see the module docs); None for a stage
    run by hand, which then gets a parent run of its own."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    if os.environ.get("DVC_EXP_NAME"):
        base = os.environ.get("DVC_EXP_BASELINE_REV", "")[:7]
        return f"dvc-exp:{os.environ['DVC_EXP_NAME']}@{base}"
    return _dvc_process_key()


@contextlib.contextmanager
def fluent_uri(uri: str):
    """MLflow's fluent API on ``uri`` inside, as before afterwards (``set_tracking_uri``
    exports MLFLOW_TRACKING_URI, which later subprocesses of this process would inherit)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # (unsets the variable too)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(c, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created on first use as a model-training experiment."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(
            name, artifact_location=local_artifact_root(tracking_uri), tags=EXPERIMENT_KIND
        )
    except Exception:  # created meanwhile by another stage or worker
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(c, experiment: str, tag: str, value: str, status: str | None = None):
    """The newest run of ``experiment`` tagged ``tag`` = ``value`` (and in ``status``), or None."""
    query = f"tags.`{tag}` = '{value}'" + (f" and attributes.status = '{status}'" if status else "")
    runs = c.search_runs(
        [experiment], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


class Tracking:
    """A stage's view of MLflow: its pipeline's parent run and its own nested run."""

    def __init__(self, options: TrackingOptions):
        self.options = options
        self.uri = resolve_tracking_uri(options.tracking_uri)
        self.client = client(self.uri)
        self.experiment_id = experiment_id(self.client, options.experiment, self.uri)
        self.external_parent = os.environ.get(PARENT_ENV)
        self.key = invocation_key()
        self.parent: str | None = None
        self.run_id: str | None = None
        self.name = ""
        self._monitor = None
        self.continued = False
        """Whether :meth:`start` continued a killed attempt's run."""
        self.results: Mapping | None = None
        """What :func:`stage_run` ends the run with (the stage's final metrics)."""

    def _pipeline_parent(self) -> str:
        if self.external_parent:
            return self.external_parent
        if self.key is not None:
            found = find_run(self.client, self.experiment_id, PIPELINE_TAG, self.key)
            if found is not None:
                return found.info.run_id
        tags = {KIND_TAG: "pipeline", PIPELINE_TAG: self.key or f"stage-{time.time_ns()}"}
        if os.environ.get("DVC_EXP_NAME"):
            tags["cfebm.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
        run = self.client.create_run(
            self.experiment_id, run_name=time.strftime("pipeline-%Y%m%d-%H%M%S"), tags=tags
        )
        return run.info.run_id

    def start(self, name: str, key: str, params: Mapping[str, Any], tags: Mapping) -> bool:
        """Open the stage's nested run (``name``; ``key`` identifies the stage's work, so a
        killed attempt is continued); True if a killed run was continued."""
        self.name = name
        killed = find_run(self.client, self.experiment_id, STAGE_KEY_TAG, key, "RUNNING")
        if killed is not None and not self.external_parent:
            self.run_id = killed.info.run_id
            self.parent = killed.data.tags.get("mlflow.parentRunId")
            if self.parent and self.key:  # the rest of this invocation joins that pipeline run
                self.client.set_tag(self.parent, PIPELINE_TAG, self.key)
            self.continued = True
        else:
            if killed is not None:
                self.client.set_terminated(killed.info.run_id, "KILLED")
            self.parent = self._pipeline_parent()
            tags = {
                "mlflow.parentRunId": self.parent,
                KIND_TAG: "stage",
                STAGE_KEY_TAG: key,
                **tags,
            }
            if os.environ.get("DVC_EXP_NAME"):
                tags["cfebm.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
            self.run_id = self.client.create_run(
                self.experiment_id, run_name=name, tags=tags
            ).info.run_id
            self.params(params)
            self.continued = False
        if self.options.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10)
            self._monitor.start()
        return self.continued

    def params(self, params: Mapping[str, Any]) -> None:
        """The stage's settings on its run, and those that every stage of a pipeline run
        shares (not the per-stage ones) on the parent run."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        flat = {k: str(v)[:6000] for k, v in flatten(redact(dict(params))).items()}
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])
        shared = [Param(k, v) for k, v in flat.items() if k not in PER_STAGE_PARAMS]
        # Batches of 100: one the parent refuses (it has a value from a run with other
        # settings) loses only its own.
        for i in range(0, len(shared) if self.parent else 0, 100):
            with contextlib.suppress(MlflowException):
                self.client.log_batch(self.parent, params=shared[i : i + 100])

    def end(self, status: str = "FINISHED", results: Mapping | None = None) -> None:
        """End the stage's run (``results``: its final metrics, also logged to the parent
        run as ``<stage run>/<key>``) and bring the pipeline run's status and end time up
        to date."""
        if self._monitor is not None:
            self._monitor.finish()
        if results and self.parent:
            values = flat_metrics(results)
            log_metrics(
                self.client, self.parent, 0, {f"{self.name}/{k}": v for k, v in values.items()}
            )
        flush()
        self.client.set_terminated(self.run_id, status)
        if self.parent and not self.external_parent:
            prev = self.client.get_run(self.parent).info.status
            final = "FAILED" if "FAILED" in (status, prev) else "FINISHED"
            self.client.set_terminated(self.parent, final)


@contextlib.contextmanager
def stage_run(options: TrackingOptions, name: str, key: str, params: Mapping, tags: Mapping):
    """The stage's nested run (:meth:`Tracking.start`) around the stage's work, or None
    when tracking is off: FINISHED with ``results`` at the end, FAILED on an error, and
    left running when the stage is interrupted (the next attempt continues it)."""
    if not options.enabled:
        yield None
        return
    track = Tracking(options)
    track.start(name, key, params, tags)
    try:
        yield track
    except KeyboardInterrupt:
        raise
    except BaseException:
        track.end("FAILED")
        raise
    track.end("FINISHED", results=track.results)


# --- logging (also from workers) -------------------------------------------------------------


_QUEUED: list = []
"""The futures (RunOperations) of this process's queued metric batches."""


def log_metrics(c, run_id: str, step: int, values: Mapping[str, float]) -> None:
    """Metrics of one step, queued for MLflow's asynchronous logging (batched in the
    background; :func:`flush` waits for them)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, int(step)) for k, v in values.items() if v is not None]
    if metrics:
        _QUEUED.append(c.log_batch(run_id, metrics=metrics, synchronous=False))


def flush() -> None:
    """Wait until every metric that :func:`log_metrics` queued in this process is stored, by
    each batch's own future. (``mlflow.flush_async_logging`` restarts MLflow's logging
    thread, which waits up to a second for its queue: a second at every checkpoint.)"""
    from mlflow.exceptions import MlflowException

    while _QUEUED:  # (in any order: all of them are waited for)
        with contextlib.suppress(MlflowException):  # a failed batch: MLflow has said so
            _QUEUED.pop().wait()


def log_png(c, run_id: str, png: bytes, artifact_file: str | None = None, key=None, step=0):
    """A PNG as an artifact file, or as an image with a step (``key``: the UI's slider)."""
    from PIL import Image

    step = None if key is None else int(step)
    c.log_image(run_id, Image.open(io.BytesIO(png)), artifact_file, key=key, step=step)


def flat_metrics(values: Mapping, prefix: str = "") -> dict[str, float]:
    """Nested numbers -> {"a/b": 1.0}: DVC's nested metric keys as MLflow metric names."""
    out: dict[str, float] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_metrics(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def log_stage(
    name: str,
    options: Any,
    metrics: Mapping,
    pngs: Mapping[str, bytes] = {},  # noqa: B006 - read only
    texts: Mapping[str, str] = {},  # noqa: B006 - read only
    curve: list[tuple[int, Mapping[str, float]]] = (),
    log=print,
) -> str | None:
    """Log one stage that runs in this process (its settings ``options``, whose ``mlflow``
    says where) as a nested run of the pipeline run: settings, metrics (flattened), PNGs,
    texts and a training ``curve`` [(step, values)]; says so with ``log`` and returns the
    run id (None when tracking is off)."""
    if not options.mlflow.enabled:
        return None
    key, params = f"{name}:{invocation_key()}:{time.time_ns()}", {name: public(options)}
    with stage_run(options.mlflow, name, key, params, {"cfebm.stage": name}) as t:
        for step, values in curve:
            log_metrics(t.client, t.run_id, step, {f"train/{k}": v for k, v in values.items()})
        log_metrics(t.client, t.run_id, 0, flat_metrics(metrics))
        for file, data in pngs.items():
            log_png(t.client, t.run_id, data, f"{name}/{file}")
        t.client.log_text(t.run_id, json.dumps(metrics, indent=2), f"{name}/metrics.json")
        for file, text in texts.items():
            t.client.log_text(t.run_id, text, f"{name}/{file}")
        t.results = metrics
    log(f"{name}: logged to MLflow run {t.run_id}")
    return t.run_id
