"""`python -m pipelines.tune` as DVC runs it, on a local Ray started by the CLI: a tiny
search (4 trials of 24 steps, digits at 4x4) killed in the middle of a trial and run again.

Checks that the second run restores the Tune experiment instead of starting over
(finished trials are not trained again, the interrupted one continues from its checkpoint,
no trial is added), that ASHA stops the trials in a deliberately bad region (huge Langevin
step sizes, which saturate every sample) early, before and after the restore, that the best
setting written to tune/best.json lies in the search space, and that MLflow holds one
nested run per trial under the stage's ``tune`` run under the pipeline run.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import yaml
from train_fixtures import kill_group, ray_tmpdir, run, start, wait_for

from cfebm.data import PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare
from cfebm.features import FeatureTrainConfig, LabelledImages, save_feature_net, train_feature_net

pytestmark = pytest.mark.slow

GOOD = (1.0, 0.5)
BAD = (300.0, 1000.0)
STEP_SIZES = [GOOD[0], BAD[0], GOOD[1], BAD[1]]  # the grid, in trial order
NOISE = (0.01, 0.02)
TRAIN_STEPS, EVAL_EVERY = 24, 6


def tune_params() -> dict:
    return {
        "train": {
            "model": {"channels": 1, "resolutions": [4, 8], "base_width": 8},
            "sampler": {"steps": 5, "step_size": 1.0, "noise_start": 0.015},
            "optim": {"batch_size": {4: 32}, "lr": {4: 0.001}, "stable_images": 3200},
        },
        "tune": {
            "data": "data/pyramid",
            "score": {
                "num_samples": 64,
                "num_reference": 128,
                "kid_subsets": 10,
                "kid_subset_size": 64,
            },
            "train_steps": TRAIN_STEPS,
            "eval_every": EVAL_EVERY,
            "num_samples": 1,  # one pass over the grid
            "max_concurrent_trials": 1,  # a fixed order, so that ASHA's decisions are too
            "include_baseline": False,
            "space": {
                "step_size": {"values": STEP_SIZES, "grid": True},
                "noise_start": {"low": NOISE[0], "high": NOISE[1], "log": True},
            },
            "asha": {"grace_steps": EVAL_EVERY, "reduction_factor": 2},
            "ray": {"local_cpus": 2, "state_every_s": 0},  # state saved after every result
            "report_delay_s": 1.0,  # a window to kill the search mid-trial
        },
    }


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The search run twice: killed while the third trial trains, then to the end."""
    root = tmp_path_factory.mktemp("tune")
    prepare(PrepareConfig(source="digits", out=str(root / "data/prepared"), resolution=8))
    build_pyramid(
        PyramidConfig(input=str(root / "data/prepared"), out=str(root / "data/pyramid"), coarsest=4)
    )
    store = PyramidStore(str(root / "data/pyramid"))
    labelled = LabelledImages({r: store.read("train", r) for r in (4, 8)}, store.labels("train"))
    net = train_feature_net(labelled, FeatureTrainConfig(epochs=2, width=8, feature_dim=16), [10])
    save_feature_net(net, str(root / "models/features.pt"), "cfebm-digits-cnn", {"dataset": "x"})
    with open(root / "params.yaml", "w") as f:
        yaml.safe_dump(tune_params(), f)

    renv = {"RAY_TMPDIR": ray_tmpdir(), "MLFLOW_TRACKING_URI": ""}
    cmd = ["python", "-m", "pipelines.tune", "--params", "params.yaml"]
    first_log = str(root / "first.log")
    first = start(cmd, root, first_log, **renv)
    third = re.compile(rf"trial (\w+_00002) .* step {2 * EVAL_EVERY}/{TRAIN_STEPS}")

    def third_trial_mid_way():
        """The third trial has scored twice and the experiment's saved state lists the first
        two as finished (what a restore reads; under load it can lag the log), with the
        searcher's state saved with it (a restore whose searcher state is older than its
        trials made the first trial again, with an empty config)."""
        with open(first_log) as f:
            return (
                third.search(f.read())
                and finished_in_saved_state(root) >= 2
                and searcher_state_current(root)
            )

    try:
        wait_for(third_trial_mid_way, 240, "the third trial's second score", proc=first)
    finally:
        kill_group(first)  # the CLI and the local Ray it started
    with open(first_log) as f:
        first_out = f.read()
    second = run(cmd, root, timeout=300, **renv)
    return root, first_out, second.stdout + second.stderr


STATE_FILES = ("basic-variant-state", "experiment_state")


SAME_SAVE_S = 0.25
"""Tune writes both state files in one save, then copies its staging folder into the
experiment folder in no fixed order (seen: the searcher's file 2 ms before or after the
experiment's). A stale searcher state is older by a whole save: here at least
``report_delay_s`` (1 s), as Tune saves after every result."""


def searcher_state_current(root) -> bool:
    """Whether the search algorithm's saved state comes from the experiment's newest save."""
    newest = [sorted(root.glob(f"runs/tune/*/{kind}-*.json")) for kind in STATE_FILES]
    if not all(newest):
        return False
    searcher, experiment = (files[-1].stat().st_mtime for files in newest)
    return searcher >= experiment - SAME_SAVE_S


def finished_in_saved_state(root) -> int:
    """Trials that the Tune experiment's newest saved state file lists as TERMINATED."""
    states = sorted(root.glob("runs/tune/*/experiment_state-*.json"))
    if not states:
        return 0
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being written
        return 0
    return sum(json.loads(state)["status"] == "TERMINATED" for state, _ in data["trial_data"])


def trial_lines(out: str, trial_id: str) -> list[str]:
    return [line for line in out.splitlines() if f"trial {trial_id} (" in line]


def test_the_second_run_restores_the_experiment(searched):
    root, first, second = searched
    assert "new experiment" in first and "restoring the experiment" in second
    ids = sorted(set(re.findall(r"trial (\w+_0000\d) \(", first)))
    assert [i[-1] for i in ids] == ["0", "1", "2"]  # the fourth had not started
    # Finished trials are not trained again; the third continues from a checkpoint.
    assert not trial_lines(second, ids[0]) and not trial_lines(second, ids[1])
    resumed = [line for line in trial_lines(second, ids[2]) if "resumed at step" in line]
    assert len(resumed) == 1
    assert int(resumed[0].rsplit(" ", 1)[1]) in (EVAL_EVERY, 2 * EVAL_EVERY)

    best = json.loads((root / "tune/best.json").read_text())
    assert [t["trial_id"] for t in best["trials"]] == [*ids, ids[0][:-1] + "3"]  # no extra trial
    metrics = json.loads((root / "metrics/tune.json").read_text())
    assert metrics["restored"] is True and metrics["trials"] == 4


def test_asha_stops_the_bad_region_early_and_the_best_is_in_the_space(searched):
    root, _, _ = searched
    best = json.loads((root / "tune/best.json").read_text())
    by_size = {t["setting"]["step_size"]: t for t in best["trials"]}
    assert sorted(by_size) == sorted(STEP_SIZES)
    for eta in BAD:  # 1000 ran after the restore: ASHA's rungs were rebuilt
        assert by_size[eta]["outcome"] == "stopped_early", by_size[eta]
        assert by_size[eta]["step"] == EVAL_EVERY
    assert by_size[GOOD[0]]["outcome"] == "completed"
    assert by_size[GOOD[0]]["step"] == TRAIN_STEPS

    sampler = best["sampler"]
    assert set(sampler) == {"step_size", "noise_start"}
    assert sampler["step_size"] in GOOD and NOISE[0] <= sampler["noise_start"] <= NOISE[1]
    assert best["step"] == TRAIN_STEPS and best["metric_key"] == "kid_mean_cfebm-digits-cnn"
    assert best["score"] == min(t["score"] for t in best["trials"] if t["step"] == TRAIN_STEPS)
    assert np.isfinite(best["score"]) and best["score"] < by_size[BAD[0]]["score"]


def test_every_trial_is_a_nested_mlflow_run_under_the_pipeline_run(searched):
    from mlflow import MlflowClient

    root, _, _ = searched
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("cfebm")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'pipeline'")
    (tune_run,) = client.search_runs([exp.experiment_id], "tags.`cfebm.stage` = 'tune' and "
                                     "tags.`cfebm.kind` = 'stage'")  # fmt: skip
    assert tune_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # FINISHED once its stage has ended; the next stage of the same `dvc repro` reopens it
    assert parent.info.status == "FINISHED"
    assert tune_run.info.status == "FINISHED"
    trials = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'trial'")
    best = json.loads((root / "tune/best.json").read_text())
    outcomes = {t["trial_id"]: t["outcome"] for t in best["trials"]}
    assert len(trials) == 4  # the resumed trial continued its run
    for r in trials:
        trial_id = r.data.params["trial_id"]
        assert r.data.tags["mlflow.parentRunId"] == tune_run.info.run_id
        assert r.info.status == "FINISHED"
        assert r.data.tags["cfebm.tune.outcome"] == outcomes[trial_id]
        assert float(r.data.params["step_size"]) in STEP_SIZES
        scores = client.get_metric_history(r.info.run_id, "kid_mean_cfebm-digits-cnn")
        assert scores and max(m.step for m in scores) == max(
            t["step"] for t in best["trials"] if t["trial_id"] == trial_id
        )
    assert tune_run.data.metrics["best_score"] == pytest.approx(best["score"])
    resumed = [r for r in trials if "resumed_from_step" in r.data.metrics]
    assert len(resumed) == 1
    assert os.path.isdir(root / "runs/tune")  # Tune's state: outside the DVC outputs
