"""Training-stage settings, cluster path checks, the run key and MLflow helpers (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from cfebm.config import ConfigError
from pipelines import ray_utils, tracking
from pipelines.train import resolve
from pipelines.train_params import params_from_dict, run_key, worker_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_params() -> dict:
    with open(os.path.join(REPO, "params.yaml")) as f:
        return yaml.safe_load(f)["train"]


def test_the_repository_params_are_valid_and_wire_one_dvc_stage_per_resolution():
    params = params_from_dict(repo_params())
    res = params.cfebm.model.resolutions
    assert [s["stage"] for s in params.stages] == list(range(len(res)))
    assert params.stages[0]["after"] == params.data
    for s in range(1, len(res)):
        assert params.stages[s]["after"] == params.model_path(s - 1)


def test_command_line_overrides_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": repo_params()}))
    params, args = resolve(["--params", str(path), "--stage", "2", "--workers", "2"])
    assert params.ray.workers == 2 and args.stage == 2
    with pytest.raises(ConfigError, match="stages 0..2"):
        resolve(["--params", str(path), "--stage", "3"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ray": {"wokers": 2}}, "unknown train.ray option.*wokers"),
        ({"optim": {"lr": {4: -1}}}, "train.lr entries must be > 0"),
        ({"rollback": {"lr_factor": 2}}, "lr_factor must be in"),
        ({"model": {"resolutions": [4, 8]}}, "train.stages lists 3 stage"),
        ({"colour": 1}, "unknown train option.*colour"),
        ({"out": "elsewhere"}, r"train.stages\[1\].*after: elsewhere/stage0/model.pt"),
    ],
)
def test_bad_settings_name_the_option(change, message):
    data = repo_params()
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    with pytest.raises(ConfigError, match=message):
        params_from_dict(data)


def test_batch_sizes_are_global_and_split_over_workers():
    cfg = params_from_dict(repo_params()).cfebm
    assert worker_config(cfg, 2).train.batch_size == {4: 64, 8: 64, 16: 32}
    assert worker_config(cfg, 1) is cfg
    with pytest.raises(ConfigError, match="multiple of 3"):
        worker_config(cfg, 3)


def test_run_key_changes_with_what_the_result_depends_on():
    cfg = params_from_dict(repo_params()).cfebm
    inputs = {"dataset": "a", "previous_model": "b"}
    key = run_key(cfg, 1, inputs)
    assert key == run_key(cfg, 1, dict(inputs))
    assert key != run_key(cfg, 2, inputs)
    assert key != run_key(cfg, 1, {**inputs, "previous_model": "c"})
    other = params_from_dict({**repo_params(), "optim": {"seed": 1}}).cfebm
    assert key != run_key(other, 1, inputs)


def test_local_storage_is_refused_on_a_multi_node_cluster():
    paths = {"train.ray.storage": "/work/runs/ray"}
    ray_utils.check_paths(1, paths, shared_filesystem=False)  # one node: fine
    with pytest.raises(ray_utils.ClusterStorageError, match="3 nodes.*local path.*s3://"):
        ray_utils.check_paths(3, paths, shared_filesystem=False)
    ray_utils.check_paths(3, paths, shared_filesystem=True)
    ray_utils.check_paths(3, {"train.ray.storage": "s3://bucket/runs"}, shared_filesystem=False)


def test_workers_get_object_store_and_tracking_settings_only():
    env = {"AWS_ENDPOINT_URL": "x", "MLFLOW_TRACKING_TOKEN": "t", "HOME": "/root", "PATH": "p"}
    assert ray_utils.worker_env(env) == {"AWS_ENDPOINT_URL": "x", "MLFLOW_TRACKING_TOKEN": "t"}


def test_a_local_dataset_is_staged_to_remote_storage_for_a_cluster(tmp_path, s3_env):
    from cfebm.data import PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare

    prepared, pyramid = str(tmp_path / "prepared"), str(tmp_path / "pyramid")
    prepare(PrepareConfig(source="shapes", num_train=20, num_test=4, resolution=8, out=prepared))
    build_pyramid(PyramidConfig(input=prepared, out=pyramid, coarsest=4))
    assert ray_utils.dataset_for_workers(pyramid, f"{s3_env}/runs", 1, False) == pyramid
    url = ray_utils.dataset_for_workers(pyramid, f"{s3_env}/runs", 2, False)
    assert url.startswith(f"{s3_env}/runs/datasets/")
    remote, local = PyramidStore(url, cache_dir=str(tmp_path / "cache")), PyramidStore(pyramid)
    assert (remote.read("train", 4) == local.read("train", 4)).all()
    assert ray_utils.dataset_for_workers(pyramid, f"{s3_env}/runs", 2, False) == url  # once


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri(None, str(tmp_path))
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.local_artifact_root(uri) == f"file://{tmp_path}/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_flatten_keeps_resolution_tables_as_one_value():
    flat = tracking.flatten({"optim": {"lr": {4: 0.001}, "seed": 0}, "ray": {"workers": 2}})
    assert flat == {"optim.lr": '{"4": 0.001}', "optim.seed": "0", "ray.workers": "2"}


def test_cfebm_imports_no_ray_mlflow_or_dvc():
    code = (
        "import sys, cfebm, cfebm.trainer, cfebm.checkpoint, cfebm.sampling, cfebm.data;"
        "bad = [m for m in ('ray', 'mlflow', 'dvc') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_sampler_from_tune_overrides_train_sampler(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"sampler": {"step_size": 0.12, "noise_start": 0.003}}))
    p = params_from_dict(
        {"sampler": {"step_size": 1.0, "steps": 30}, "sampler_from_tune": str(best)}
    )
    s = p.cfebm.sampler
    assert (s.step_size, s.noise_start, s.steps) == (0.12, 0.003, 30)
    with pytest.raises(ConfigError, match="run the tune stage"):
        params_from_dict({"sampler_from_tune": str(tmp_path / "none.json")})


def test_one_parent_run_per_dvc_repro_continued_after_a_kill(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    state = str(tmp_path / "runs" / "mlflow-pipeline.json")

    def runs(invocation: str) -> tracking.PipelineRuns:
        monkeypatch.setenv(tracking.PIPELINE_ENV, invocation)
        return tracking.PipelineRuns(uri, "exp", state_path=state)

    def status(run_id: str) -> str:
        return r.client.get_run(run_id).info.status

    r = runs("repro-1")  # two stages of one dvc repro share the parent
    p1 = r.parent()
    s0, _ = r.stage(p1, "k0", "stage0", {}, {})
    r.end_stage(s0)
    assert status(p1) == "FINISHED"
    r = runs("repro-1")
    assert r.parent() == p1 and status(p1) == "RUNNING"  # reopened for the next stage
    s1, _ = r.stage(p1, "k1", "stage1", {}, {})
    r.end_stage(s1)
    assert status(p1) == "FINISHED"

    r = runs("repro-2")  # the next dvc repro is a new pipeline run, killed mid-stage
    p2 = r.parent()
    assert p2 != p1
    killed, _ = r.stage(p2, "k1", "stage1", {}, {})
    r = runs("repro-3")  # continues the killed pipeline run and its stage's run
    assert r.parent() == p2
    assert r.stage(p2, "k1", "stage1", {}, {}) == (killed, True)
    other, continued = r.stage(p2, "k2", "stage2", {}, {})
    assert not continued
    r.end_stage(other, "FAILED")
    assert status(killed) == "RUNNING"  # still open in this invocation
    r.end_stage(killed)
    assert status(p2) == "FAILED"  # a stage of it failed

    r = runs("repro-4")
    p4 = r.parent()
    stale, _ = r.stage(p4, "k5", "stage5", {}, {})  # killed, and the stage is not resumed
    r = runs("repro-5")
    assert r.parent() == p4
    fresh, _ = r.stage(p4, "k6", "stage6", {}, {})
    r.end_stage(fresh)
    assert status(stale) == "KILLED" and status(p4) == "FINISHED"


def test_dvc_processes_are_recognised():
    assert tracking._is_dvc(["/venv/bin/python", "/venv/bin/dvc", "repro"])
    assert tracking._is_dvc(["dvc", "exp", "run"])
    assert tracking._is_dvc(["python3", "-m", "dvc", "repro"])
    assert not tracking._is_dvc(["python", "-m", "pipelines.train"])
    assert not tracking._is_dvc(["/bin/sh", "-c", "dvc repro"])
