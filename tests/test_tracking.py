"""MLflow grouping and `pipelines.compare` against a real MLflow store (a sqlite file):
stages of one invocation share one parent run, which is never set back to running; a
killed stage's run is continued by its next attempt; compare reads the groups as they are."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import pytest

from pipelines import tracking
from pipelines.compare import CompareOptions, compare, load_pipelines
from pipelines.compare import main as compare_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRACTOR = "cfebm-digits-cnn"


def options(uri: str, experiment: str = "cfebm") -> tracking.TrackingOptions:
    return tracking.TrackingOptions(tracking_uri=uri, experiment=experiment)


def stage(
    monkeypatch, uri, invocation, name, key, params=None, tags=None, metrics=None, end="FINISHED"
):
    """One stage process: opens its run, logs, ends it (unless ``end`` is None: killed)."""
    monkeypatch.setenv(tracking.PIPELINE_ENV, invocation)
    t = tracking.Tracking(options(uri))
    continued = t.start(name, key, params or {}, tags or {})
    if metrics:
        tracking.log_metrics(t.client, t.run_id, 0, metrics)
    if end:
        t.end(end)
    return t, continued


def status(t, run_id):
    return t.client.get_run(run_id).info.status


def test_stages_of_one_invocation_share_a_parent_that_is_never_reopened(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    a, _ = stage(monkeypatch, uri, "repro-1", "stage0", "k0")
    assert status(a, a.parent) == "FINISHED"
    seen = []
    original = a.client.__class__.update_run

    def spy(self, run_id, status=None, **kw):
        seen.append((run_id, status))
        return original(self, run_id, status=status, **kw)

    monkeypatch.setattr(a.client.__class__, "update_run", spy)
    b, _ = stage(monkeypatch, uri, "repro-1", "stage1", "k1", end="FAILED")
    assert b.parent == a.parent and not seen  # joined without setting it back to running
    assert status(b, b.parent) == "FAILED"
    c, _ = stage(monkeypatch, uri, "repro-1", "evaluate", "k2")
    assert status(c, c.parent) == "FAILED"  # a failed stage keeps it failed
    d, _ = stage(monkeypatch, uri, "repro-2", "stage0", "k0")
    assert d.parent != a.parent  # the next invocation is a new pipeline run
    exp = d.client.get_experiment_by_name("cfebm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_killed_stage_is_continued_under_its_pipeline_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    first, _ = stage(monkeypatch, uri, "repro-1", "stage0", "k0")
    killed, _ = stage(monkeypatch, uri, "repro-1", "stage1", "k1", end=None)
    again, continued = stage(monkeypatch, uri, "repro-2", "stage1", "k1")
    assert continued and again.run_id == killed.run_id and again.parent == first.parent
    after, _ = stage(monkeypatch, uri, "repro-2", "evaluate", "k2")
    assert after.parent == first.parent  # the rest of the invocation joins that pipeline run
    runs = after.client.search_runs([after.experiment_id], "tags.`cfebm.kind` = 'pipeline'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_an_orchestrators_parent_is_used_and_left_to_it(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "cfebm", uri)
    parent = c.create_run(exp, run_name="orchestrator").info.run_id
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    t, _ = stage(monkeypatch, uri, "x", "stage0", "k0")
    assert t.parent == parent and status(t, parent) == "RUNNING"


def pipeline(monkeypatch, uri, invocation, step_size, seconds, scores, tune_best):
    """One pipeline run as tune, train@0, train@1, evaluate@0 and evaluate@1 record it."""
    t, _ = stage(
        monkeypatch,
        uri,
        invocation,
        "tune-stage0",
        f"tune-{invocation}",
        {"tune": {"num_samples": 4}},
        {"cfebm.stage": "tune"},
        {"best_score": tune_best},
    )
    train = {
        "model": {"base_width": 16},
        "sampler": {"step_size": step_size},
        "ray": {"workers": 1},
    }
    for s, sec in enumerate(seconds):
        stage(
            monkeypatch,
            uri,
            invocation,
            f"stage{s}",
            f"s{s}-{invocation}",
            {"train": train, "stage": s},
            {"cfebm.stage": str(s)},
            {"stage_seconds": sec},
        )
    for s, (fid, kid) in enumerate(scores):
        metrics = {f"stage_{s}/fid_{EXTRACTOR}": fid, f"stage_{s}/kid_mean_{EXTRACTOR}": kid}
        stage(
            monkeypatch,
            uri,
            invocation,
            "evaluate",
            f"e{s}-{invocation}",
            {"evaluate": {"num_samples": 1000}},
            {"cfebm.stage": "evaluate"},
            metrics,
        )
    tracking.flush()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv(tracking.PARENT_ENV, raising=False)
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    pipeline(mp, uri, "repro-a", 1.0, [10.0, 20.0], [(30.0, 0.5), (40.0, 0.6)], 0.2)
    pipeline(mp, uri, "repro-b", 0.5, [30.0, 40.0], [(20.0, 0.3), (25.5, 0.4)], 0.1)
    mp.undo()
    return uri


def rows_of(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        cells = [p.strip() for p in line.split("  ") if p.strip()]
        if len(cells) >= 2:
            out[cells[0]] = cells[1:]
    return out


def test_table_shows_what_differs_scores_per_stage_and_training_time(store):
    rows = rows_of(compare(CompareOptions(tracking_uri=store, last=5)))
    assert rows["status"] == ["FINISHED", "FINISHED"]
    assert rows["train.sampler.step_size"] == ["0.5", "1"]  # newest first, params.yaml names
    assert "train.model.base_width" not in rows  # equal in both: not shown
    assert "stage" not in rows
    assert rows[f"fid s0 [{EXTRACTOR}]"] == ["20", "30"]
    assert rows[f"kid s1 [{EXTRACTOR}]"] == ["0.4", "0.6"]
    assert rows["tune best"] == ["0.1", "0.2"] and rows["train seconds"] == ["70", "30"]
    assert rows["stages"] == ["tune, train@0, train@1, evaluate"] * 2


def test_compare_leaves_the_processs_tracking_uri_as_it_was(store, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: after compare in one process
    (this test's worker), the next stage it started logged into compare's store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    compare(CompareOptions(tracking_uri=store))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    compare(CompareOptions(tracking_uri=store))
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"


def test_last_limits_and_show_forces_parameters(store):
    rows = load_pipelines(CompareOptions(tracking_uri=store, last=5))
    newest = load_pipelines(CompareOptions(tracking_uri=store, last=1))
    assert len(rows) == 2 and list(newest.index) == [rows.index[0]]
    assert newest["train seconds"].iloc[0] == 70.0
    forced = rows_of(compare(CompareOptions(tracking_uri=store, show=["train.ray.*"])))
    assert forced["train.ray.workers"] == ["1", "1"]


def test_cli_csv_has_one_row_per_run(store, capsys):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "pipelines.compare", "--tracking_uri", store]
    done = subprocess.run(  # as a user runs it; the error case through the same main()
        [*cmd, "--format", "csv"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    table = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [r["train.sampler.step_size"] for r in table] == ["0.5", "1"]
    with pytest.raises(SystemExit) as missing:
        compare_main(["--tracking_uri", store, "--experiment", "no"])
    assert "no MLflow experiment 'no'" in str(missing.value.code)


def test_flush_waits_until_every_queued_metric_is_stored(tmp_path):
    """What a checkpoint relies on (a killed worker loses nothing logged before it): after
    flush, another client of the store reads every step queued asynchronously."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    run_id = c.create_run(tracking.experiment_id(c, "flush", uri)).info.run_id
    for step in range(1, 101):
        tracking.log_metrics(c, run_id, step, {"loss": -step, "skipped": None})
    tracking.flush()
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, -s) for s in range(1, 101)]
    assert not MlflowClient(uri).get_metric_history(run_id, "skipped")  # None: not logged


def test_a_checkpoint_is_registered_only_after_its_steps_are_stored(tmp_path, monkeypatch):
    """A worker killed right after Ray registers a checkpoint resumes from that step, so
    the steps it logged before must already be in the store (the train stage's checkpoint
    hook; Ray's report is replaced by a probe that reads the store as Ray would register)."""
    import ray.train
    import torch
    from mlflow import MlflowClient
    from train_fixtures import smoke_params

    from cfebm.config import from_dict
    from cfebm.trainer import Trainer
    from pipelines.train import RayHooks, TrainStage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    run_id = c.create_run(tracking.experiment_id(c, "ckpt", uri)).info.run_id
    params = smoke_params()["train"]
    cfg = from_dict({"model": params["model"], "sampler": params["sampler"]})
    trainer = Trainer(cfg, {4: torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8)})
    hooks = RayHooks({"options": TrainStage(), "run_id": run_id, "tracking_uri": uri}, 0, 1)
    seen = []

    def report(metrics, checkpoint, checkpoint_dir_name):
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        seen.append((checkpoint_dir_name, sorted(m.step for m in history), len(tracking._QUEUED)))

    monkeypatch.setattr(ray.train, "report", report)
    for step in range(1, 21):
        hooks.log(step, {"loss": -step})
    hooks.checkpoint(trainer, {"name": "checkpoint-step0000020", "step": 20})
    assert seen == [("checkpoint-step0000020", list(range(1, 21)), 0)]
