"""End to end: ``dvc repro`` of the smoke pipeline (prepare, pyramid, train@0, train@1) on
a local Ray, killed in the middle of train@1 and run again.

Checks that the second ``dvc repro`` skips what is done and resumes train@1 from its last
checkpoint (kept in runs/, outside the outputs that DVC deletes), that an injected
divergence in each stage is rolled back and recovered, that MLflow (the embedded sqlite
store) holds one pipeline run with a nested run per stage, continued across the kill,
and that the final model samples through ``pipelines.sample``.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from train_fixtures import kill_group, make_project, ray_tmpdir, run, smoke_params, start, wait_for

pytestmark = pytest.mark.slow

INJECT_AT = 15


def read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def registered_steps(root) -> list[int]:
    """Steps of the train@1 checkpoints that Ray Train has registered."""
    steps = []
    for snap in glob.glob(f"{root}/runs/ray/stage1-8x8-*/checkpoint_manager_snapshot.json"):
        try:
            with open(snap) as f:
                steps += [r["metrics"]["step"] for r in json.load(f)["checkpoint_results"]]
        except (OSError, ValueError):  # being rewritten
            pass
    return steps


def test_killed_repro_resumes_the_stage_and_divergence_is_recovered(tmp_path):
    # tests/params_smoke.yaml: train@0 60 steps, train@1 90 steps of 32 images
    params = smoke_params(debug={"inject_divergence_at_step": INJECT_AT})  # a NaN step each
    root = make_project(tmp_path / "proj", params)
    renv = {"RAY_TMPDIR": ray_tmpdir()}
    log = str(tmp_path / "first.log")
    first = start(["dvc", "repro", "train@1"], root, log, **renv)
    try:
        wait_for(
            lambda: [s for s in registered_steps(root) if s >= 2 * INJECT_AT],
            400,
            "a train@1 checkpoint after the injected divergence",
            proc=first,
        )
    finally:
        kill_group(first)  # dvc, the stage's driver and its local Ray
    assert os.path.exists(f"{root}/models/stage0/model.pt")
    assert not os.path.exists(f"{root}/metrics/train-stage1.json")
    killed_at = max(registered_steps(root))

    second = run(["dvc", "repro", "train@1"], root, timeout=400, **renv)
    out = second.stdout + second.stderr
    assert "Running stage 'train@0'" not in out and "Running stage 'train@1'" in out

    m0, m1 = (
        {**read(f"{root}/metrics/train-stage{s}.json"), **read(f"{root}/models/stage{s}/run.json")}
        for s in (0, 1)
    )  # results, and how the run went
    assert m0["status"] == "completed" and m0["step"] == 60 and m0["rollbacks"] == 1
    assert m0["lr"] == pytest.approx(0.5e-3)  # lowered once by the rollback
    # Resumed, not restarted: the step counter and the images seen went on.
    assert m1["status"] == "completed" and m1["step"] == 90
    assert m1["resumed_from_step"] >= killed_at >= 2 * INJECT_AT
    assert m1["steps_this_run"] == 90 - m1["resumed_from_step"]
    assert m1["rollbacks"] == 1 and m1["total_images"] == (60 + 90) * 32
    assert "resumed from the checkpoint at step" in out

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("cfebm")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'pipeline'")
    stages = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'stage'")
    assert parent.info.status == "FINISHED"
    # Only the data and training stages run here (train_fixtures.training_pipeline): one
    # nested run per training stage, the killed one continued rather than duplicated.
    assert sorted(r.data.tags["cfebm.stage"] for r in stages) == ["0", "1"]
    for r in stages:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(r.info.run_id, "rollbacks")] == [1]
    (s1,) = (r for r in stages if r.data.tags["cfebm.stage"] == "1")
    resumed = client.get_metric_history(s1.info.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [m1["resumed_from_step"]]
    loss_steps = {m.step for m in client.get_metric_history(s1.info.run_id, "loss")}
    assert loss_steps >= set(range(1, 91))

    run(["python", "-m", "pipelines.sample", "--model", "models/stage1/model.pt",
         "--num", "8", "--out", "s.png"], root)  # fmt: skip
    assert os.path.getsize(f"{root}/s.png") > 0
    assert "up to date" in run(["dvc", "status"], root).stdout
