"""A training stage on a 2-node Ray cluster started on this machine, with checkpoints on
a moto S3 endpoint and MLflow on a real ``mlflow server``, all checked from outside
(``make submit``, the pipeline as a Ray job, is tested end to end in test_infra.py):

- a local checkpoint storage is refused on a multi-node cluster;
- one stage trains across both nodes (DDP, SPREAD) and survives four faults: three
  worker kills at random moments, then the loss of the second node while its worker
  uploads its part of a checkpoint (an HTTP proxy in front of the S3 endpoint holds the
  upload). Ray Train restarts the workers from the last registered checkpoint in S3 each
  time (on the surviving node at the end); the stage finishes with exactly the weights of
  an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
import time

import pytest
import torch
from conftest import S3_CREDENTIALS
from train_fixtures import (
    HoldingProxy,
    MlflowServer,
    free_port,
    kill_group,
    make_project,
    ray_tmpdir,
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
WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


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

    names = ("RAY_TMPDIR", "PATH", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT", NICENESS, WATCHER)
    saved = {k: os.environ.get(k) for k in names}
    os.environ[NICENESS] = "0"  # as pipelines.ray_utils does for a local Ray
    os.environ[WATCHER] = "0"  # as infra/local/cluster.sh does: no spot instances here
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


def train_here(root: str, stage: int) -> None:
    """``python -m pipelines.train --stage <stage>`` in project ``root``, through the
    stage's main() in this process (a driver of its own would only add the start-up time of
    torch and Ray); the environment that the stage sets for Ray Train is restored after."""
    import ray

    from pipelines import train

    saved = dict(os.environ)
    try:
        with contextlib.chdir(root):
            train.main(["--params", "params.yaml", "--stage", str(stage)])
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_local_storage_is_refused_on_two_nodes(cluster, pyramid, tmp_path):
    """The refusal is a one-line error before any work."""
    root = project(tmp_path, pyramid, ray={"storage": "runs/ray", "address": cluster.address})
    with pytest.raises(SystemExit) as e:
        train_here(root, 0)
    message = str(e.value.code)
    assert message.startswith("train: error: ")
    assert "2 nodes but train.ray.storage" in message and "local path" in message
    assert not os.path.exists(os.path.join(root, "models"))


def train_workers(cluster, node=None) -> list[int]:
    """PIDs of the live Ray Train workers of this cluster (its state API: other tests'
    clusters on the machine have workers of the same name), or of its ``node`` alone."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    if node is not None:
        filters.append(("node_id", "=", node.node_id))
    actors = list_actors(address=cluster.address, filters=filters, raise_on_missing_output=False)
    return [a.pid for a in actors if a.pid]


def kill_a_worker(cluster, rng: random.Random, registered) -> tuple[int, int]:
    """SIGKILL one live train worker, chosen at random, and wait until Ray Train has
    replaced every worker of that group; returns the newest checkpoint step that
    ``registered()`` lists just before the kill and once the new workers are up (a later
    checkpoint is the new workers' own: the next kill is a failure of its own)."""
    pids = wait_for(lambda: train_workers(cluster), 120, "live train workers")
    newest = max((step for _, step in registered()), default=0)
    os.kill(rng.choice(pids), signal.SIGKILL)

    def restarted() -> bool:
        now = train_workers(cluster)
        return bool(now) and set(now).isdisjoint(pids)

    wait_for(restarted, 120, "the restarted train workers")
    return newest, max((step for _, step in registered()), default=0)


def redone_steps(losses, resumes) -> list[int]:
    """Steps trained again after each restart: the highest step logged before the restart
    logged where it resumed, less that step (0 when the kill came before any step after
    the checkpoint was logged; a lower bound, as metrics still queued in the killed worker
    never reach MLflow)."""
    out = []
    for resume in sorted(resumes, key=lambda m: m.timestamp):
        before = [m.step for m in losses if m.timestamp <= resume.timestamp]
        out.append(max(0, max(before, default=0) - int(resume.value)))
    return out


def test_a_stage_survives_repeated_kills_and_losing_a_node(
    cluster, aws, mlflow_server, pyramid, tmp_path
):
    """One stage on two nodes (DDP, SPREAD) with its checkpoints on S3, killed four times:
    three worker kills at random moments, then the loss of the second node while its
    worker's checkpoint upload is in flight. Ray Train restarts the workers (the last
    time on the surviving node) from the last registered checkpoint each time; the stage
    ends with exactly the weights of the same stage run without interruption, keeps no
    partial checkpoint, and has logged every step to MLflow."""
    import s3fs
    from mlflow import MlflowClient

    steps, every = 100, 10
    train = {
        "ray": {
            "workers": 2,
            "placement_strategy": "SPREAD",
            "keep_checkpoints": 2,
            "max_failures": 6,
        },
        "optim": {"fade_images": 1600, "stable_images": 1600},  # 100 steps of 32
        "loop": {"checkpoint_every": every},
    }
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
    storage = {"reference": f"{aws}/reference", "killed": f"{aws}/kill"}
    roots = {}
    for name, url in storage.items():
        mlflow = {"tracking_uri": mlflow_server.url, "experiment": "cluster"}
        ray = {**train["ray"], "storage": url}
        killed = name == "killed"  # paced so that five kills land before the stage ends
        roots[name] = project(
            tmp_path / name,
            pyramid,
            **{**train, "ray": ray, "mlflow": mlflow if killed else {"enabled": False}},
            debug={"checkpoint_delay_s": 0.5 if killed else 0.0},
        )
        save_checkpoint(
            stage0.model_state(), os.path.join(roots[name], "models", "stage0", "model.pt")
        )
    t0 = time.monotonic()
    train_here(roots["reference"], 1)  # on the cluster (RAY_ADDRESS), uninterrupted
    t_reference = time.monotonic() - t0

    cmd = ["python", "-m", "pipelines.train", "--stage", "1"]
    proxy = HoldingProxy(os.environ["AWS_ENDPOINT_URL"])  # the S3 that the workers see
    log = str(tmp_path / "driver.log")
    root = roots["killed"]
    driver = start(cmd, root, log, RAY_ADDRESS=cluster.address, AWS_ENDPOINT_URL=proxy.url)
    fs = s3fs.S3FileSystem()
    bucket_path = storage["killed"].removeprefix("s3://")

    def registered() -> list[tuple[str, int]]:
        """(run folder, step) of the checkpoints that Ray Train has registered (an
        upload in progress does not count: a restart could not resume from it)."""
        fs.invalidate_cache()
        found = []
        for snap in fs.glob(f"{bucket_path}/stage1-8x8-*/checkpoint_manager_snapshot.json"):
            with contextlib.suppress(json.JSONDecodeError):  # (being rewritten)
                results = json.loads(fs.cat_file(snap))["checkpoint_results"]
                found += [(os.path.dirname(snap), r["metrics"]["step"]) for r in results]
        return found

    def newer_than(step: int):
        return lambda: [s for _, s in registered() if s > step]

    rng = random.Random(20261202)
    kills = []  # (what, the newest registered checkpoint's step when it happened)
    try:
        newest = 0
        for _ in range(3):  # at random moments, each after progress since the last
            newest = max(wait_for(newer_than(newest), 300, "a new checkpoint", proc=driver))
            time.sleep(rng.uniform(0.0, 1.0))
            at_kill, newest = kill_a_worker(cluster, rng, registered)
            kills.append(("worker", at_kill))
        # The second node is lost while its worker uploads its part of a checkpoint: that
        # upload never arrives, and the run ends on the surviving node.
        (node,) = cluster.worker_nodes
        (uploader,) = wait_for(lambda: train_workers(cluster, node), 120, "its train worker")
        proxy.hold(r"/checkpoint-step\d+/rank\d+\.pt$", pid=uploader)
        assert proxy.caught.wait(300), "no checkpoint upload after the third kill"
        held = int(re.search(r"checkpoint-step(\d+)", proxy.held).group(1))
        assert proxy.holder() == uploader
        kills.append(("node, in checkpoint", max(step for _, step in registered())))
        # The whole machine at once: its workers die with it (remove_node alone stops the
        # node's Ray processes, and a worker outliving them finished the upload on a retry).
        os.kill(uploader, signal.SIGKILL)
        cluster.remove_node(node, allow_graceful=False)
        proxy.drop()
        rc = driver.wait(timeout=400)
        t_killed = time.monotonic() - t0 - t_reference
    finally:
        if driver.poll() is None:
            kill_group(driver)
        proxy.stop()
        add_second_node(cluster)  # back to two nodes for any later test
    with open(log) as f:
        output = f.read()
    assert rc == 0, output
    assert "resumed from the checkpoint at step" in output  # (Ray folds alike lines)
    # The tracking server holds the runs: no default (sqlite) store opened beside them.
    assert not os.path.exists(os.path.join(root, "mlflow.db"))

    metrics = {}  # results, and how the run went
    for path in ("metrics/train-stage1.json", "models/stage1/run.json"):
        with open(os.path.join(root, path)) as f:
            metrics.update(json.load(f))
    assert metrics["status"] == "completed" and metrics["workers"] == 2
    assert metrics["step"] == steps and metrics["stage_images"] == steps * 32
    assert metrics["resumed_from_step"] >= kills[-1][1]  # the last fault: the node
    assert metrics["steps_this_run"] == steps - metrics["resumed_from_step"]

    # The same weights, optimiser and Langevin state as without any interruption.
    final = load_checkpoint(os.path.join(root, "models", "stage1", "model.pt"))
    reference = load_checkpoint(os.path.join(roots["reference"], "models", "stage1", "model.pt"))
    assert final["stage"] == 1 and final["state"]["step"] == steps
    assert final["state"] == reference["state"]  # steps, images, FLOPs, rollbacks
    assert final["model"].keys() == reference["model"].keys()
    for key, weights in reference["model"].items():
        assert torch.equal(final["model"][key], weights), key
    with open(os.path.join(roots["reference"], "metrics", "train-stage1.json")) as f:
        expected = json.load(f)
    assert {k: metrics[k] for k in expected} == expected  # loss, energies, FLOPs, images

    # Only whole checkpoints are kept: the held upload's folder was written again in full
    # when training passed that step again, and Ray keeps the newest two.
    run_dir = registered()[0][0]
    fs.invalidate_cache()
    ckpts = sorted(p for p in fs.ls(run_dir) if "/checkpoint-step" in p)
    assert [p.rsplit("-step", 1)[1] for p in ckpts] == [f"{steps - every:07d}", f"{steps:07d}"]
    for ckpt in ckpts:
        files = {p.rsplit("/", 1)[1] for p in fs.ls(ckpt)}
        assert files == {"trainer.pt", "rank0.pt", "rank1.pt"}, ckpt
        for name in files:
            with fs.open(f"{ckpt}/{name}", "rb") as f:
                assert isinstance(torch.load(f, weights_only=True), dict), f"{ckpt}/{name}"
    assert fs.glob(f"{bucket_path}/datasets/*/manifest.json")  # staged data

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("cluster")
    (stage_run,) = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'stage'")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'pipeline'")
    run_id = stage_run.info.run_id
    assert stage_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage_run.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert stage_run.data.params["train.ray.workers"] == "2"  # named as in params.yaml
    assert stage_run.data.params["train.model.base_width"] == "8"
    losses = client.get_metric_history(run_id, "loss")
    assert {m.step for m in losses} >= set(range(1, steps + 1))  # every step, across restarts
    for key in ("energy_data", "energy_sample", "beta", "grad_norm", "images_per_s"):
        assert client.get_metric_history(run_id, key), key
    history = client.get_metric_history(run_id, "resumed_from_step")
    resumed = [m.value for m in sorted(history, key=lambda m: m.timestamp)]
    assert len(resumed) == len(kills) and resumed[-1] == metrics["resumed_from_step"]
    assert all(v % every == 0 for v in resumed)  # each from a registered checkpoint
    # Never from further back than the newest registered checkpoint at the kill, and not
    # from the checkpoint whose upload was cut off.
    assert all(v >= at for v, (_, at) in zip(resumed, kills)), (resumed, kills)
    assert resumed[3] < held, (resumed, held)
    lost = redone_steps(losses, history)
    print(
        f"\nsteps redone per kill: {list(zip([k for k, _ in kills], lost))}; resumed at "
        f"{resumed}; uninterrupted run {t_reference:.0f} s, killed run {t_killed:.0f} s"
    )
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
