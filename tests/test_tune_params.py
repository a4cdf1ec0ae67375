"""The tune stage without Ray trials: settings, search space (cfebm.search), experiment key,
the choice of the best trial, the tuned sampler that training reads, ASHA's restored rungs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from cfebm.config import ConfigError, build_dataclass
from cfebm.search import (
    SearchSpace,
    TrialSummary,
    TuneError,
    pick_best,
    tuned_sampler,
    with_sampler,
)
from pipelines import tune as tune_stage
from pipelines.train import TrainStage
from pipelines.tune import TuneStage, _resumable_asha, base_config, experiment_key, param_space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = {
    "model": {"channels": 1, "resolutions": [4, 8], "base_width": 8},
    "sampler": {"steps": 5, "step_size": 1.0, "noise_start": 0.015},
    "optim": {"batch_size": {4: 32}, "fade_images": 320, "stable_images": 640},
}


def tune(section: dict | None = None) -> TuneStage:
    return build_dataclass(TuneStage, section or {}, "tune")


def train() -> TrainStage:
    return build_dataclass(TrainStage, TRAIN, "train")


def test_defaults_are_valid_and_small():
    p = tune()
    assert p.stage == 0 and p.score.metric == "kid" and p.score.extractor == "domain"
    assert p.asha.enabled and p.num_samples * p.train_steps <= 400  # minutes, not hours
    assert set(p.space.dimensions()) == {"step_size", "noise_start"}
    assert p.space.step_size.log and p.space.step_size.low < 1.0 < p.space.step_size.high


@pytest.mark.parametrize(
    "section, message",
    [
        ({"bogus": 1}, r"unknown option\(s\) tune\.bogus"),
        ({"space": {"step_size": {"low": 0, "high": 1, "log": True}}}, "log-scale range"),
        ({"space": {"step_size": {"low": 2, "high": 1}}}, "must be below"),
        ({"space": {"steps": {"values": [10, 2.5]}}}, "not a positive integer"),
        ({"space": {"step_size": None, "noise_start": None}}, "searches nothing"),
        ({"space": {"noise_start": {"grid": True, "low": 0.1, "high": 1}}}, "grid needs values"),
        ({"stage": 1}, "tune.warm_start"),
        ({"eval_every": 50, "train_steps": 20}, "eval_every"),
        ({"score": {"metric": "is"}}, r"tune\.score: metric 'is'"),
        ({"asha": {"reduction_factor": 1}}, "reduction_factor"),
        ({"ray": {"keep_checkpoints": 0}}, "keep_checkpoints"),
        ({"num_samples": "4"}, r"tune\.num_samples must be an integer, got the string"),
    ],
)
def test_bad_settings_name_the_option(section, message):
    with pytest.raises(ConfigError, match=message):
        tune(section)


def test_param_space_maps_each_dimension_to_a_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = build_dataclass(
        SearchSpace,
        {
            "step_size": {"low": 0.1, "high": 10, "log": True},
            "noise_start": {"low": 0.0, "high": 0.02},
            "steps": {"values": [10, 20], "grid": True},
        },
        "tune.space",
    )
    domains = param_space(space)
    assert isinstance(domains["step_size"], Float)
    assert (domains["step_size"].lower, domains["step_size"].upper) == (0.1, 10)
    assert "LogUniform" in type(domains["step_size"].get_sampler()).__name__
    assert type(domains["noise_start"].get_sampler()).__name__.lstrip("_") == "Uniform"
    assert domains["steps"] == {"grid_search": [10, 20]}
    choice = param_space(build_dataclass(SearchSpace, {"steps": {"values": [5, 9]}}, "s"))
    assert isinstance(choice["steps"], Categorical) and choice["steps"].categories == [5, 9]
    ranged = param_space(build_dataclass(SearchSpace, {"steps": {"low": 5, "high": 9}}, "s"))
    assert isinstance(ranged["steps"], Integer)
    assert (ranged["steps"].lower, ranged["steps"].upper) == (5, 10)  # inclusive


def test_trial_config_takes_train_settings_and_the_trial_sampler():
    base = base_config(tune({"optim": {"fade_images": 64}}), train())
    assert base.model.resolutions == (4, 8) and base.train.fade_images == 64
    assert base.train.stable_images == 640  # train.optim, not overridden
    cfg = with_sampler(base, {"step_size": 0.3, "steps": 7.0})
    assert cfg.sampler.step_size == 0.3 and cfg.sampler.steps == 7
    assert cfg.sampler.noise_start == base.sampler.noise_start
    with pytest.raises(ConfigError, match="tune.stage 2"):
        base_config(tune({"stage": 2, "warm_start": "m.pt"}), train())
    with pytest.raises(ConfigError, match="tune.optim"):
        base_config(tune({"optim": {"nope": 1}}), train())


def test_experiment_key_follows_what_the_result_depends_on():
    p = tune()
    base = base_config(p, train())
    inputs = {"dataset": "abc"}
    key = experiment_key(p, base, inputs)
    moved = tune(
        {"ray": {"storage": "s3://b/x"}, "out": "o.json", "mlflow": {"enabled": False}, "data": "x"}
    )
    assert experiment_key(moved, base, inputs) == key  # where things are is not a result
    assert experiment_key(tune({"num_samples": 8}), base, inputs) != key
    assert experiment_key(p, base, {"dataset": "other"}) != key
    other = base_config(tune({"optim": {"seed": 1}}), train())
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


def test_tuned_sampler_is_read_and_checked(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"sampler": {"step_size": 0.25, "noise_start": 0.004}}))
    assert tuned_sampler(str(path)) == {"step_size": 0.25, "noise_start": 0.004}
    with pytest.raises(ConfigError, match="does not exist; run the tune stage"):
        tuned_sampler(str(tmp_path / "missing.json"))
    path.write_text(json.dumps({"sampler": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match="invalid sampler settings"):
        tuned_sampler(str(path))


class FakeTrial(SimpleNamespace):
    """What the scheduler reads of a trial: its id and latest checkpoint."""

    def __hash__(self):
        return hash(self.trial_id)


def test_resumable_asha_rebuilds_its_rungs_from_trial_checkpoints(tmp_path):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    def checkpoint(name, scores):
        d = tmp_path / name
        d.mkdir()
        (d / "scores.json").write_text(json.dumps(scores))
        return ray.tune.Checkpoint.from_directory(str(d))

    finished = FakeTrial(trial_id="t0", checkpoint=checkpoint("t0", [[10, 0.2], [20, 0.1]]))
    stopped = FakeTrial(trial_id="t1", checkpoint=checkpoint("t1", [[10, 0.3]]))
    new = FakeTrial(trial_id="t2", checkpoint=None)
    decisions = {}
    for name, make in (("plain", ASHAScheduler), ("resumable", _resumable_asha)):
        sched = make(time_attr="step", max_t=40, grace_period=10, reduction_factor=2)
        sched.set_search_properties("score", "min")
        for trial in (finished, stopped, new):  # what Tune does for the trials it restores
            sched.on_trial_add(None, trial)
        decisions[name] = sched.on_trial_result(None, new, {"step": 10, "score": 0.9})
    assert decisions["plain"] == TrialScheduler.CONTINUE  # empty rungs after a restore
    assert decisions["resumable"] == TrialScheduler.STOP  # worse than the restored rung


def test_cli_dry_run_and_help(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": TRAIN, "tune": {"num_samples": 3}}))
    cmd = [sys.executable, "-m", "pipelines.tune", "--params", str(params)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(  # as a user runs it; the other cases through the same main()
        [*cmd, "--dry-run", "--seed", "4"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["num_samples"] == 3 and resolved["seed"] == 4
    assert resolved["base_config"]["model"]["resolutions"] == [4, 8]
    with pytest.raises(SystemExit) as bad:
        tune_stage.main(["--params", str(params), "--stage", "1"])
    assert "tune.warm_start" in str(bad.value.code)
    capsys.readouterr()
    with pytest.raises(SystemExit) as shown:
        tune_stage.main(["--params", str(params), "--help"])
    assert shown.value.code == 0
    helptext = capsys.readouterr().out
    for option in (
        "--time_budget_s",
        "--max_concurrent_trials",
        "--num_samples",
        "--ray.storage",
        "--score.metric",
    ):
        assert option in helptext
