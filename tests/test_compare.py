"""`pipelines.compare` against a real MLflow store (a sqlite file) holding two pipeline runs
written the way the stages write them (pipelines.tracking): tune, training stages and an
evaluate run, once under a parent of its own (what happens after the last training stage
ended the pipeline run) and once under the pipeline run itself."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time

import pytest

from pipelines import tracking
from pipelines.compare import CompareOptions, compare, load_pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRACTOR = "cfebm-digits-cnn"


def train_params(step_size: float, stage: int) -> dict:
    flat = tracking.flatten(
        {
            "data": "data/pyramid",
            "cfebm": {
                "model": {"base_width": 16, "resolutions": [4, 8]},
                "sampler": {"step_size": step_size, "steps": 30},
                "train": {"lr": {4: 0.001}, "seed": 0},
            },
            "ray": {"workers": 1},
        }
    )
    return {**flat, "stage": str(stage), "resolution": str(4 * 2**stage), "ray_run_name": "x"}


def pipeline(runs, step_size, seconds, scores, tune_best, evaluate_apart):
    """One pipeline run as tune, train@0, train@1, evaluate@0 and evaluate@1 record it."""
    parent = runs.parent()
    tune_run, _ = runs.stage(
        parent, "tune", "tune-stage0", {"num_samples": "4", "seed": "0"}, {"cfebm.stage": "tune"}
    )
    runs.client.log_metric(tune_run, "best_score", tune_best)
    runs.end_stage(tune_run)
    for stage, s in [(0, 999.0), *enumerate(seconds)]:  # train@0 run twice: the last counts
        run_id, _ = runs.stage(
            parent, f"s{stage}", f"stage{stage}", train_params(step_size, stage),
            {"cfebm.stage": str(stage)},
        )  # fmt: skip
        runs.client.log_metric(run_id, "stage_seconds", s)
        runs.end_stage(run_id)
        time.sleep(0.01)
    for stage, (fid, kid) in enumerate(scores):
        if evaluate_apart and stage == len(scores) - 1:
            # The last training stage ended the pipeline run: evaluate@1 gets its own.
            runs.end_pipeline(parent)
            parent = runs.parent()
        params = {"models": f"models/stage{stage}/model.pt", "num_samples": "1000"}
        run_id, _ = runs.stage(parent, "evaluate", "evaluate", params, {"cfebm.stage": "evaluate"})
        runs.client.log_metric(run_id, f"stage_{stage}/fid_{EXTRACTOR}", fid)
        runs.client.log_metric(run_id, f"stage_{stage}/kid_mean_{EXTRACTOR}", kid)
        runs.end_stage(run_id)
        time.sleep(0.01)
    runs.end_pipeline(parent)
    time.sleep(0.02)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    runs = tracking.PipelineRuns(uri, "cfebm", state_path=str(root / "state.json"))
    pipeline(runs, 1.0, [10.0, 20.0], [(30.0, 0.5), (40.0, 0.6)], 0.2, evaluate_apart=True)
    pipeline(runs, 0.5, [30.0, 40.0], [(20.0, 0.3), (25.5, 0.4)], 0.1, evaluate_apart=False)
    return uri


def rows_of(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        parts = line.split("  ")
        cells = [p.strip() for p in parts if p.strip()]
        if len(cells) >= 2:
            out[cells[0]] = cells[1:]
    return out


def test_table_shows_what_differs_scores_per_stage_and_training_time(store):
    text = compare(CompareOptions(tracking_uri=store, last=5))
    rows = rows_of(text)
    assert rows["status"] == ["FINISHED", "FINISHED"]
    assert rows["train.cfebm.sampler.step_size"] == ["0.5", "1"]  # newest first
    assert "train.cfebm.model.base_width" not in rows  # equal in both: not shown
    assert "train.stage" not in rows and "train.resolution" not in rows
    assert rows["fid s0"] == ["20", "30"] and rows["fid s1"] == ["25.5", "40"]
    assert rows["kid s0"] == ["0.3", "0.5"] and rows["kid s1"] == ["0.4", "0.6"]
    assert rows["tune best"] == ["0.1", "0.2"]
    assert rows["train time"] == ["1m10s", "0m30s"]
    # The evaluate run under a parent of its own joins the pipeline run that trained, and
    # the scores of the per-stage evaluate runs are gathered.
    assert rows["stages"] == ["tune, train x2, evaluate"] * 2
    assert f"feature space of {EXTRACTOR}" in text


def test_follow_up_parents_are_merged_and_last_limits(store):
    rows, extractors = load_pipelines(CompareOptions(tracking_uri=store, last=5))
    assert len(rows) == 2 and extractors == [EXTRACTOR]
    (newest,), _ = load_pipelines(CompareOptions(tracking_uri=store, last=1))
    assert newest.run_id == rows[0].run_id and newest.train_seconds == 70.0
    forced = rows_of(compare(CompareOptions(tracking_uri=store, params=["train.ray.*"])))
    assert forced["train.ray.workers"] == ["1", "1"]


def test_cli_csv_has_one_row_per_run(store):
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.compare", "--tracking-uri", store, "--format", "csv"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    table = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(table) == 2
    assert [r["train.cfebm.sampler.step_size"] for r in table] == ["0.5", "1"]
    assert table[0]["fid s0"] == "20" and table[1]["train time"] == "0m30s"
    missing = subprocess.run(
        [sys.executable, "-m", "pipelines.compare", "--tracking-uri", store, "--experiment", "no"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode != 0 and "no MLflow experiment 'no'" in missing.stderr
