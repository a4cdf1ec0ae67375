"""A training stage on a 2-node Ray cluster started on this machine, with checkpoints on
a moto S3 endpoint and MLflow on a real ``mlflow server``, all checked from outside
(``make submit``, the pipeline as a Ray job, is tested end to end in test_infra.py):

- a local checkpoint storage is refused on a multi-node cluster;
- one stage trains across both nodes (DDP, SPREAD); killing the second node mid-stage
  makes Ray Train restart the workers on the surviving node from the last checkpoint in
  S3, and the stage completes (resumed, not restarted).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import S3_CREDENTIALS
from train_fixtures import (
    MlflowServer,
    free_port,
    kill_group,
    make_project,
    ray_tmpdir,
    run,
    smoke_params,
    start,
    wait_for,
)

from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import from_dict
from cfebm.data import PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare
from cfebm.loop import fit
from cfebm.trainer import Trainer

pytestmark = pytest.mark.slow
NICENESS = "RAY_worker_niceness"  # Ray's own (lower-case) config variable


@pytest.fixture(scope="module")
def aws(s3_server, tmp_path_factory):
    """The moto endpoint in this process's environment, so that the cluster's processes
    (started from here) and the drivers inherit it, as nodes with credentials would."""
    import s3fs

    saved = dict(os.environ)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": s3_server,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
            "AWS_CONFIG_FILE": "/nonexistent/config",
            "CFEBM_CACHE_DIR": str(tmp_path_factory.mktemp("shard-cache")),
            **S3_CREDENTIALS,
        }
    )
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("cluster-runs")
    yield "s3://cluster-runs"
    os.environ.clear()
    os.environ.update(saved)
    s3fs.S3FileSystem.clear_instance_cache()


def add_second_node(cluster) -> None:
    """A second node with 2 CPUs. Its own temp folder: nodes on one machine would share
    the session folder, where a node unpacking a job's working_dir replaces the folder
    that the job's driver runs in (something two real machines never do)."""
    cluster.add_node(num_cpus=2, temp_dir=ray_tmpdir())


@pytest.fixture(scope="module")
def cluster(aws):
    """A head (2 CPUs, dashboard for jobs and the state API) and a second node (2 CPUs)."""
    import ray
    from ray.cluster_utils import Cluster

    names = ("RAY_TMPDIR", "PATH", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT", NICENESS)
    saved = {k: os.environ.get(k) for k in names}
    os.environ[NICENESS] = "0"  # as pipelines.ray_utils does for a local Ray
    os.environ["RAY_TMPDIR"] = ray_tmpdir()
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    # The cluster's own processes find it by RAY_ADDRESS, not by scanning the machine.
    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": free_port()},
    )
    add_second_node(c)
    yield c
    c.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(str(tmp_path_factory.mktemp("mlflow")))
    yield server
    server.stop()


def project(root, data_dir, **train) -> str:
    """A smoke project whose data is the prepared pyramid at ``data_dir``."""
    params = smoke_params(data=str(data_dir), **train)
    params["train"]["stages"][0]["after"] = str(data_dir)  # stage 0 runs after that pyramid
    return make_project(root, params, git=False)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    params = smoke_params()
    prep = params["prepare"]
    prepare(
        PrepareConfig(
            source="digits",
            resolution=prep["resolution"],
            shard_size=prep["shard_size"],
            out=str(root / "prepared"),
        )
    )
    build_pyramid(
        PyramidConfig(input=str(root / "prepared"), out=str(root / "pyramid"), coarsest=4)
    )
    return str(root / "pyramid")


def test_local_storage_is_refused_on_two_nodes(cluster, pyramid, tmp_path):
    root = project(tmp_path, pyramid, ray={"storage": "runs/ray"})
    done = run(
        ["python", "-m", "pipelines.train", "--stage", "0"],
        root,
        check=False,
        RAY_ADDRESS=cluster.address,
    )
    assert done.returncode != 0
    assert "2 nodes but train.ray.storage" in done.stderr and "local path" in done.stderr


def test_a_stage_across_two_nodes_survives_losing_a_node(
    cluster, aws, mlflow_server, pyramid, tmp_path
):
    import s3fs
    from mlflow import MlflowClient

    storage = f"{aws}/kill"
    root = project(
        tmp_path,
        pyramid,
        ray={
            "workers": 2,
            "placement_strategy": "SPREAD",
            "storage": storage,
            "keep_checkpoints": 2,
        },
        mlflow={"tracking_uri": mlflow_server.url, "experiment": "cluster"},
        optim={"fade_images": 1600, "stable_images": 3200},  # 150 steps of 32
        loop={"checkpoint_every": 20},
    )
    params = smoke_params()
    # Stage 1 warm-starts from a stage-0 model: a few plain (non-Ray) steps suffice here.
    cfg = from_dict(
        {
            "model": params["train"]["model"],
            "sampler": params["train"]["sampler"],
            "train": params["train"]["optim"],
        }  # fmt: skip
    )
    images = torch.from_numpy(PyramidStore(pyramid).read("train", 4).copy())
    stage0 = Trainer(cfg, {4: images})
    fit(stage0, max_steps=3)
    save_checkpoint(stage0.model_state(), os.path.join(root, "models", "stage0", "model.pt"))

    log = str(tmp_path / "driver.log")
    driver = start(
        ["python", "-m", "pipelines.train", "--stage", "1"], root, log, RAY_ADDRESS=cluster.address
    )
    try:
        fs = s3fs.S3FileSystem()
        bucket_path = storage.removeprefix("s3://")

        def registered() -> list[tuple[str, int]]:
            """(run folder, step) of the checkpoints that Ray Train has registered (an
            upload in progress does not count: a restart could not resume from it)."""
            fs.invalidate_cache()
            found = []
            for snap in fs.glob(f"{bucket_path}/stage1-8x8-*/checkpoint_manager_snapshot.json"):
                results = json.loads(fs.cat_file(snap))["checkpoint_results"]
                found += [(os.path.dirname(snap), r["metrics"]["step"]) for r in results]
            return found

        run_dir, first = wait_for(registered, 300, "a registered checkpoint", proc=driver)[0]
        (node,) = cluster.worker_nodes
        cluster.remove_node(node, allow_graceful=False)
        rc = driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            kill_group(driver)
        add_second_node(cluster)  # back to two nodes for any later test
    with open(log) as f:
        output = f.read()
    assert rc == 0, output

    metrics = {}  # results, and how the run went
    for path in ("metrics/train-stage1.json", "models/stage1/run.json"):
        with open(os.path.join(root, path)) as f:
            metrics.update(json.load(f))
    assert metrics["status"] == "completed" and metrics["workers"] == 2
    assert metrics["step"] == 150 and metrics["stage_images"] == 4800
    # Resumed from a checkpoint (at least the one seen before the kill), not restarted.
    assert metrics["resumed_from_step"] >= first, output
    assert metrics["steps_this_run"] == 150 - metrics["resumed_from_step"]
    assert "resumed from the checkpoint at step" in output

    fs.invalidate_cache()
    kept = sorted(fs.ls(run_dir))
    ckpts = [p for p in kept if "/checkpoint-step" in p]
    assert len(ckpts) == 2 and ckpts[-1].endswith("checkpoint-step0000150")  # keep: 2
    assert {p.rsplit("/", 1)[1] for p in fs.ls(ckpts[-1])} == {
        "trainer.pt",
        "rank0.pt",
        "rank1.pt",
    }
    assert fs.glob(f"{bucket_path}/datasets/*/manifest.json")  # staged data

    model = load_checkpoint(os.path.join(root, "models", "stage1", "model.pt"))
    assert model["stage"] == 1 and model["state"]["step"] == 150

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("cluster")
    (stage_run,) = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'stage'")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'pipeline'")
    run_id = stage_run.info.run_id
    assert stage_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage_run.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert stage_run.data.params["train.ray.workers"] == "2"  # named as in params.yaml
    assert stage_run.data.params["train.model.base_width"] == "8"
    loss_steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert loss_steps >= set(range(1, 151))  # every step, across the restart
    for key in ("energy_data", "energy_sample", "beta", "grad_norm", "images_per_s"):
        assert client.get_metric_history(run_id, key), key
    resumed = client.get_metric_history(run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [metrics["resumed_from_step"]]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"final", "images", "config.yaml"} <= artifacts
    (logged,) = client.search_logged_models(
        [exp.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert logged.name == "model"  # the MLflow model (pipelines.serving)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert len([p for p in images if p.endswith(".png") and "samples" in p]) >= 2
    finals = {a.path for a in client.list_artifacts(run_id, "final")}
    assert finals == {"final/chain.png", "final/samples.png"}
