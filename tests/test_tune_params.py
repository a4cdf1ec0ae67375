"""The tune stage without Ray trials: settings, search space, experiment key, the choice
of the best trial, the tuned sampler that training reads, and ASHA's restored rungs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cfebm.config import ConfigError, SamplerConfig, from_dict
from pipelines.tune import TrialSummary, TuneError, param_space, pick_best
from pipelines.tune_params import (
    SearchSpace,
    baseline_point,
    experiment_key,
    params_from_dict,
    trial_base_config,
    with_sampler,
)
from pipelines.tune_result import apply_tuned_sampler, tuned_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = {
    "model": {"channels": 1, "resolutions": [4, 8], "base_width": 8},
    "sampler": {"steps": 5, "step_size": 1.0, "noise_start": 0.015},
    "optim": {"batch_size": {4: 32}, "fade_images": 320, "stable_images": 640},
}


def test_defaults_are_valid_and_small():
    p = params_from_dict({})
    assert p.stage == 0 and p.metric == "kid" and p.extractor == "domain"
    assert p.asha.enabled and p.num_samples * p.train_steps <= 400  # minutes, not hours
    assert set(p.space.dimensions()) == {"step_size", "noise_start"}
    assert p.space.step_size.log and p.space.step_size.low < 1.0 < p.space.step_size.high


@pytest.mark.parametrize(
    "section, message",
    [
        ({"bogus": 1}, "unknown tune option"),
        ({"space": {"step_size": {"low": 0, "high": 1, "log": True}}}, "log-scale range"),
        ({"space": {"step_size": {"low": 2, "high": 1}}}, "must be below"),
        ({"space": {"steps": {"values": [10, 2.5]}}}, "not a positive integer"),
        ({"space": {"step_size": None, "noise_start": None}}, "searches nothing"),
        ({"space": {"noise_start": {"grid": True, "low": 0.1, "high": 1}}}, "grid needs values"),
        ({"stage": 1}, "tune.warm_start"),
        ({"eval_every": 50, "train_steps": 20}, "eval_every"),
        ({"metric": "is"}, "tune.metric"),
        ({"asha": {"reduction_factor": 1}}, "reduction_factor"),
        ({"ray": {"keep_checkpoints": 0}}, "keep_checkpoints"),
    ],
)
def test_bad_settings_name_the_option(section, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(section)


def test_param_space_maps_each_dimension_to_a_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = SearchSpace(
        step_size={"low": 0.1, "high": 10, "log": True},
        noise_start={"low": 0.0, "high": 0.02},
        steps={"values": [10, 20], "grid": True},
    )
    domains = param_space(space)
    assert isinstance(domains["step_size"], Float)
    assert (domains["step_size"].lower, domains["step_size"].upper) == (0.1, 10)
    assert "LogUniform" in type(domains["step_size"].get_sampler()).__name__
    assert type(domains["noise_start"].get_sampler()).__name__.lstrip("_") == "Uniform"
    assert domains["steps"] == {"grid_search": [10, 20]}
    choice = param_space(SearchSpace(steps={"values": [5, 9]}))["steps"]
    assert isinstance(choice, Categorical) and choice.categories == [5, 9]
    ranged = param_space(SearchSpace(steps={"low": 5, "high": 9}))["steps"]
    assert isinstance(ranged, Integer) and (ranged.lower, ranged.upper) == (5, 10)  # inclusive


def test_baseline_is_the_current_sampler_when_inside_the_space():
    space = SearchSpace()
    assert baseline_point(space, SamplerConfig(step_size=1.0, noise_start=0.015)) == {
        "step_size": 1.0,
        "noise_start": 0.015,
    }
    assert baseline_point(space, SamplerConfig(step_size=50.0)) is None
    grid = SearchSpace(step_size={"values": [0.5, 2.0], "grid": True}, noise_start=None)
    assert baseline_point(grid, SamplerConfig(step_size=1.0)) is None


def test_trial_config_takes_train_settings_and_the_trial_sampler():
    p = params_from_dict({"optim": {"fade_images": 64}})
    base = trial_base_config(p, TRAIN)
    assert base.model.resolutions == (4, 8) and base.train.fade_images == 64
    assert base.train.stable_images == 640  # train.optim, not overridden
    cfg = with_sampler(base, {"step_size": 0.3, "steps": 7.0})
    assert cfg.sampler.step_size == 0.3 and cfg.sampler.steps == 7
    assert cfg.sampler.noise_start == base.sampler.noise_start
    with pytest.raises(ConfigError, match="tune.stage 2"):
        trial_base_config(params_from_dict({"stage": 2, "warm_start": "m.pt"}), TRAIN)


def test_experiment_key_follows_what_the_result_depends_on():
    p = params_from_dict({})
    base = trial_base_config(p, TRAIN)
    inputs = {"dataset": "abc"}
    key = experiment_key(p, base, inputs)
    moved = params_from_dict(
        {"storage": "s3://b/x", "out": "o.json", "mlflow": {"enabled": False}, "data": "elsewhere"}
    )
    assert experiment_key(moved, base, inputs) == key  # where things are is not a result
    assert experiment_key(params_from_dict({"num_samples": 8}), base, inputs) != key
    assert experiment_key(p, base, {"dataset": "other"}) != key
    other = trial_base_config(p, {**TRAIN, "optim": {**TRAIN["optim"], "seed": 1}})
    assert experiment_key(p, other, inputs) != key


def test_best_is_the_most_trained_trial_then_the_lowest_score():
    trials = [
        TrialSummary("a", {"step_size": 1.0}, "stopped_early", 20, 0.05),  # early, lucky
        TrialSummary("b", {"step_size": 0.5}, "completed", 80, 0.20),
        TrialSummary("c", {"step_size": 0.2}, "completed", 80, 0.10),
        TrialSummary("d", {"step_size": 9.0}, "diverged", 7, None),
    ]
    assert pick_best(trials).trial_id == "c"
    with pytest.raises(TuneError, match="1 diverged, 1 error.*first error: e: boom"):
        pick_best([trials[3], TrialSummary("e", {}, "error", 0, None, "boom")])


def test_tuned_sampler_overrides_train_sampler(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"sampler": {"step_size": 0.25, "noise_start": 0.004}}))
    assert tuned_sampler(None) == {}
    merged = apply_tuned_sampler(TRAIN["sampler"], str(path))
    assert merged == {"steps": 5, "step_size": 0.25, "noise_start": 0.004}
    assert from_dict({"sampler": merged}).sampler.step_size == 0.25
    assert apply_tuned_sampler(TRAIN["sampler"], None) == TRAIN["sampler"]
    with pytest.raises(ConfigError, match="does not exist; run the tune stage"):
        tuned_sampler(str(tmp_path / "missing.json"))
    path.write_text(json.dumps({"sampler": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match="unknown sampler keys"):
        tuned_sampler(str(path))


class FakeTrial(SimpleNamespace):
    """What the scheduler reads of a trial: its id and latest checkpoint."""

    def __hash__(self):
        return hash(self.trial_id)


def test_resumable_asha_rebuilds_its_rungs_from_trial_checkpoints(tmp_path):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from pipelines.tune_scheduler import ResumableASHA

    def checkpoint(name, scores):
        d = tmp_path / name
        d.mkdir()
        (d / "scores.json").write_text(json.dumps(scores))
        return ray.tune.Checkpoint.from_directory(str(d))

    finished = FakeTrial(trial_id="t0", checkpoint=checkpoint("t0", [[10, 0.2], [20, 0.1]]))
    stopped = FakeTrial(trial_id="t1", checkpoint=checkpoint("t1", [[10, 0.3]]))
    new = FakeTrial(trial_id="t2", checkpoint=None)
    decisions = {}
    for cls in (ASHAScheduler, ResumableASHA):
        sched = cls(time_attr="step", max_t=40, grace_period=10, reduction_factor=2)
        sched.set_search_properties("score", "min")
        for trial in (finished, stopped, new):  # what Tune does for the trials it restores
            sched.on_trial_add(None, trial)
        decisions[cls] = sched.on_trial_result(None, new, {"step": 10, "score": 0.9})
    assert decisions[ASHAScheduler] == TrialScheduler.CONTINUE  # empty rungs after restore
    assert decisions[ResumableASHA] == TrialScheduler.STOP  # worse than the restored rung


def test_cli_dry_run_and_help(tmp_path):
    from pipelines.tune import build_parser, resolve

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"train": TRAIN, "tune": {"num_samples": 3}}))
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.tune",
            "--params",
            str(params),
            "--dry-run",
            "--seed",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved["num_samples"] == 3 and resolved["seed"] == 4
    assert resolved["base_config"]["model"]["resolutions"] == [4, 8]
    with pytest.raises(ConfigError, match="tune.warm_start"):
        resolve(["--params", str(params), "--stage", "1"])
    helptext = build_parser().format_help()
    for option in ("--time-budget-s", "--max-concurrent-trials", "--num-samples", "--storage"):
        assert option in helptext
