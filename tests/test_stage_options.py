"""Stage options: declared once as dataclasses, read from params.yaml strictly, overridden by
dotted command-line options, documented by --help with the values in effect; the Ray and
MLflow plumbing that does not need a cluster or a tracking server."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from cfebm.config import ConfigError, build_dataclass
from cfebm.data.store import ClusterStorageError, check_paths, dataset_for_workers
from cfebm.redact import flatten
from pipelines import _cli, ray_utils, tracking
from pipelines.evaluate import EvaluateStage
from pipelines.restore import RestoreStage
from pipelines.train import TrainStage
from pipelines.tune import TuneStage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {
    "train": TrainStage,
    "tune": TuneStage,
    "evaluate": EvaluateStage,
    "restore": RestoreStage,
}


def repo_params() -> dict:
    with open(os.path.join(ROOT, "params.yaml")) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("section", sorted(STAGES))
def test_the_repository_params_are_valid(section):
    opts = build_dataclass(STAGES[section], repo_params()[section], section)
    if section == "train":
        res = opts.model.resolutions
        assert [s["stage"] for s in opts.stages] == list(range(len(res)))


def write(tmp_path, section: dict) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(section))
    return str(path)


def test_dotted_overrides_lay_over_the_params_file(tmp_path):
    path = write(
        tmp_path, {"train": {"optim": {"lr": {4: 0.01}, "seed": 3}, "ray": {"workers": 2}}}
    )

    def stage(p):
        p.add_argument("--stage", type=int, required=True)

    opts, extra = _cli.parse(
        TrainStage,
        "train",
        ["--params", path, "--stage", "1", "--optim.lr", "{4: 0.002}", "--sampler.steps", "7"],
        arguments=stage,
    )
    assert extra.stage == 1 and opts.optim.lr == {4: 0.002} and opts.optim.seed == 3
    assert opts.sampler.steps == 7 and opts.ray.workers == 2
    # the validated objects are the cfebm configs themselves: no field copies
    assert type(opts.optim).__module__ == "cfebm.config"


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"optim": {"hflip": "false"}},
            r"train\.optim\.hflip must be true or false, got the string",
        ),
        (
            {"sampler": {"steps": "2"}},
            r"train\.sampler\.steps must be an integer, got the string '2'",
        ),
        ({"optim": {"batch_size": {4: "64"}}}, r"train\.optim\.batch_size\[4\] must be an integer"),
        ({"optim": {"lr": {4: "1e-3"}}}, r"train\.optim\.lr\[4\] must be a number, got the string"),
        ({"ray": {"workerz": 2}}, r"unknown option\(s\) train\.ray\.workerz"),
        ({"sampler": {"steps": 0}}, r"sampler\.steps must be >= 1"),
        ({"ray": {"placement_strategy": "NEAR"}}, "placement_strategy"),
        ({"ray": {"poll_interval_s": 0}}, r"train\.ray\.poll_interval_s must be > 0, got 0"),
        ({"stages": [{"stage": 0, "after": "x"}]}, "one DVC stage per resolution"),
        ({"model": {"resolutions": [4, 8], "network": "resnet"}}, "model.network"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, section, message):
    path = write(tmp_path, {"train": section})
    with pytest.raises(ConfigError, match=message):
        _cli.parse(TrainStage, "train", ["--params", path])


def test_help_documents_every_option_with_the_value_in_effect(tmp_path, capsys):
    path = write(tmp_path, {"train": {"sampler": {"step_size": 0.375}}})
    with pytest.raises(SystemExit) as e:
        _cli.parse(TrainStage, "train", ["--params", path, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--sampler.step_size" in text and "default: 0.375" in text  # the params file's
    assert "eta in x <- x - eta * dE/dx" in text  # the field's docstring
    for option in ("--optim.lr", "--loop.checkpoint_every", "--ray.workers", "--dry-run"):
        assert option in text


def test_dry_run_prints_the_resolved_settings_without_secrets(tmp_path, capsys):
    from pipelines import train

    secret = "s3cr3t-Key-Value"
    path = write(
        tmp_path,
        {
            "train": {
                "ray": {"storage_options": {"key": "AKIA", "secret": secret}},
                "data": f"https://user:{secret}@host/data",
            }
        },
    )
    train.main(["--params", path, "--stage", "0", "--dry-run"])
    out = capsys.readouterr().out
    assert secret not in out and "***" in out and "https://user:***@host/data" in out
    assert yaml.safe_load(out)["stage"] == 0


def test_sampler_from_tune_overrides_the_train_sampler(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"sampler": {"step_size": 0.12, "noise_start": 0.003}}))
    opts = build_dataclass(TrainStage, {"sampler_from_tune": str(best)}, "train")
    assert opts.config().sampler.step_size == 0.12 and opts.config().sampler.steps == 30
    missing = build_dataclass(TrainStage, {"sampler_from_tune": str(tmp_path / "no.json")}, "train")
    with pytest.raises(ConfigError, match="run the tune stage first"):
        missing.config()


def test_local_storage_is_refused_on_a_multi_node_cluster():
    paths = {"train.ray.storage": "/work/runs/ray"}
    check_paths(1, paths, shared_filesystem=False)  # one node: fine
    with pytest.raises(ClusterStorageError, match="3 nodes.*local path.*s3://"):
        check_paths(3, paths, shared_filesystem=False)
    check_paths(3, paths, shared_filesystem=True)
    check_paths(3, {"x": "s3://bucket/runs"}, shared_filesystem=False)


def test_workers_get_object_store_and_tracking_settings_but_no_credential():
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "AKIA-planted",
        "AWS_SECRET_ACCESS_KEY": "planted-secret",
        "MLFLOW_TRACKING_URI": "http://user:pw@mlflow:5000",
        "MLFLOW_TRACKING_TOKEN": "planted-token",
        "HOME": "/root",
        "PATH": "p",
    }
    # Ray records a job's and its workers' environment: credentials reach the workers
    # through their nodes' own environment, never through Ray.
    assert ray_utils.worker_env(env) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "MLFLOW_TRACKING_URI": "http://user:***@mlflow:5000",
    }


def test_a_local_dataset_is_staged_to_remote_storage_for_a_cluster(tmp_path, s3_env):
    from cfebm.data import PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare

    prepared, pyramid = str(tmp_path / "prepared"), str(tmp_path / "pyramid")
    prepare(PrepareConfig(source="shapes", num_train=20, num_test=4, resolution=8, out=prepared))
    build_pyramid(PyramidConfig(input=prepared, out=pyramid, coarsest=4))
    assert dataset_for_workers(pyramid, f"{s3_env}/runs", 1, False) == pyramid
    url = dataset_for_workers(pyramid, f"{s3_env}/runs", 2, False)
    assert url.startswith(f"{s3_env}/runs/datasets/")
    remote, local = PyramidStore(url, cache_dir=str(tmp_path / "cache")), PyramidStore(pyramid)
    assert (remote.read("train", 4) == local.read("train", 4)).all()
    assert dataset_for_workers(pyramid, f"{s3_env}/runs", 2, False) == url  # once


def test_the_tracking_store_is_the_projects_even_in_a_dvc_temp_copy(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))  # DVC sets it for --temp runs
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path}/project/mlflow.db"
    assert tracking.local_artifact_root(uri) == f"file://{tmp_path}/project/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_params_are_logged_under_their_params_yaml_names():
    flat = flatten({"train": {"optim": {"lr": {4: 0.001}, "seed": 0}, "ray": {"workers": 2}}})
    assert flat == {
        "train.optim.lr": '{"4": 0.001}',
        "train.optim.seed": "0",
        "train.ray.workers": "2",
    }


def test_invocation_keys(monkeypatch):
    monkeypatch.delenv(tracking.PIPELINE_ENV, raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-tale")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    assert tracking.invocation_key() == "dvc-exp:bushy-tale@0123456"
    monkeypatch.setenv(tracking.PIPELINE_ENV, "make-run-1")
    assert tracking.invocation_key() == "make-run-1"


def test_the_selection_weights_are_read_once_before_ray_or_named_when_missing(tmp_path):
    from pipelines.train import selection_features

    weights = tmp_path / "features.pt"

    def opts(**selection):
        section = {"features": str(weights), **selection}
        return build_dataclass(
            TrainStage, {"model": {"resolutions": [4, 8]}, "selection": section}, "train"
        )

    assert selection_features(opts(every_images=0), 1) is None  # no selection
    assert selection_features(opts(every_images=64), 0) is None  # not the last stage
    with pytest.raises(ConfigError, match=r"'domain' weights .*features\.pt, which do not exist"):
        selection_features(opts(every_images=64), 1)
    weights.write_bytes(b"the extractor")
    assert selection_features(opts(every_images=64), 1) == b"the extractor"  # for any node


def test_ray_trains_poll_interval_reaches_its_controller(monkeypatch):
    """Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s
    by default) and a checkpoint's report waits for the next poll: the stage's setting is
    among the variables that fit() passes on to the controller."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from pipelines.train import RayOptions, ray_train_settings

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # (restored afterwards)
    ray_train_settings(RayOptions(poll_interval_s=0.3))
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.3"


def test_a_stage_run_as_a_program_exits_without_the_final_collections():
    """_cli.script freezes what is alive once main() is done (the interpreter's teardown then
    skips it), passes a non-zero return on as the exit status, and freezes on exit too."""
    import gc

    gc.unfreeze()  # (a count left by anything else would let the checks below pass)
    assert gc.get_freeze_count() == 0
    try:
        _cli.script(lambda: None)
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        with pytest.raises(SystemExit) as e:
            _cli.script(lambda: 3)
        assert e.value.code == 3 and gc.get_freeze_count() > 0
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        with pytest.raises(SystemExit, match="stage: error"):
            _cli.script(lambda: sys.exit("stage: error"))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_every_stage_program_goes_through_cli_script():
    import ast

    folder = os.path.join(ROOT, "pipelines")
    programs = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                programs.append(name)
                assert ast.unparse(node.body[0]) == "_cli.script(main)", name
    assert {"train.py", "evaluate.py", "run.py", "prepare.py"} <= set(programs)
