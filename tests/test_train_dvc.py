"""End to end on one project: the smoke pipeline (prepare, pyramid, train@0, train@1) as
``make run`` runs it (``python -m pipelines.run``: ``dvc repro`` with one local Ray that the
training stages share), killed in the middle of train@1 and run again up to the finest
stage's evaluation (features, evaluate@1); then what users do with the result: DVC plots,
the registered MLflow model served over HTTP, and a DVC experiment with a changed
parameter.

The module fixture runs the pipeline once; each test checks one capability on it.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import html
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from train_fixtures import (
    BIN,
    TRAINING_STAGES,
    free_port,
    kill_group,
    make_project,
    ray_tmpdir,
    run,
    smoke_params,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow

INJECT_AT = 15
PLANTED = ("tok-PLANTED-in-params", "key-PLANTED-in-env")
"""Credentials planted in the data's storage options (params.yaml) and in the environment
(AWS_SECRET_ACCESS_KEY) of every run: nothing the runs write may contain them."""


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


def answers(url: str):
    """A probe for :func:`wait_for`: True once ``url`` answers 200."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    return probe


RAY_TMP = ray_tmpdir()
LOGS: list[str] = []
"""The console output of every run of the module (grepped for the planted secrets)."""


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """(project root, output of the second repro, the step of the last checkpoint before
    the kill)."""
    tmp = tmp_path_factory.mktemp("dvc")
    # tests/params_smoke.yaml: train@0 60 steps, train@1 90 steps of 32 images
    params = smoke_params(
        # A NaN step in each stage; checkpoints paced so that the kill lands mid-stage.
        debug={"inject_divergence_at_step": INJECT_AT, "checkpoint_delay_s": 0.5},
        data_storage_options={"token": PLANTED[0]},  # (the local filesystem ignores it)
    )
    root = make_project(tmp / "proj", params, stages=(*TRAINING_STAGES, "features", "evaluate"))
    renv = {"RAY_TMPDIR": RAY_TMP, "AWS_SECRET_ACCESS_KEY": PLANTED[1]}
    pipeline = ["python", "-m", "pipelines.run"]  # what `make run` runs
    first = start([*pipeline, "train@1"], root, str(tmp / "first.log"), **renv)
    try:
        wait_for(
            lambda: [s for s in registered_steps(root) if s >= 2 * INJECT_AT],
            400,
            "a train@1 checkpoint after the injected divergence",
            proc=first,
        )
    finally:
        kill_group(first)  # pipelines.run, its local Ray, dvc and the stage's driver
    assert os.path.exists(f"{root}/models/stage0/model.pt")
    assert not os.path.exists(f"{root}/metrics/train-stage1.json")
    killed_at = max(registered_steps(root))
    # The finest stage's evaluation (and the features stage that it needs): the coarser
    # stage's is the same stage template with another item.
    second = run([*pipeline, "evaluate@1"], root, timeout=400, **renv)
    with open(tmp / "first.log") as f:
        LOGS.extend([f.read(), second.stdout + second.stderr])
    return root, second.stdout + second.stderr, killed_at


def test_killed_repro_resumes_the_stage_and_divergence_is_recovered(killed_and_resumed):
    root, out, killed_at = killed_and_resumed
    assert "Running stage 'train@0'" not in out and "Running stage 'train@1'" in out
    # One local Ray for the whole pipeline, started by pipelines.run: the training stages
    # joined it, before the kill (train@0, train@1) and after it (train@1).
    for log, stages in ((LOGS[0], 2), (out, 1)):
        assert log.count("started a local Ray") == 1 and "run: started a local Ray" in log
        assert log.count("train: joined the Ray cluster at") == stages

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
    # One nested run per training and evaluate stage (the data and features stages log
    # none), the killed one continued rather than duplicated.
    assert sorted(r.data.tags["cfebm.stage"] for r in stages) == ["0", "1", "evaluate"]
    for r in stages:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED"
    for r in (r for r in stages if r.data.tags["cfebm.stage"] != "evaluate"):
        assert [m.value for m in client.get_metric_history(r.info.run_id, "rollbacks")] == [1]
    (s1,) = (r for r in stages if r.data.tags["cfebm.stage"] == "1")
    resumed = client.get_metric_history(s1.info.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [m1["resumed_from_step"]]
    loss_steps = {m.step for m in client.get_metric_history(s1.info.run_id, "loss")}
    assert loss_steps >= set(range(1, 91))

    run(["python", "-m", "pipelines.sample", "--model", "models/stage1/model.pt",
         "--num", "8", "--out", "s.png"], root)  # fmt: skip
    assert os.path.getsize(f"{root}/s.png") > 0
    assert "up to date" in run(["dvc", "status", "evaluate@1"], root).stdout  # and upstream


def test_plots_are_whole_across_the_kill_and_dvc_renders_them(killed_and_resumed):
    root, _, _ = killed_and_resumed
    with open(f"{root}/plots/train/stage1.csv") as f:
        rows = list(csv.DictReader(f))
    # One row per step of the stage, the steps before the kill included and none twice:
    # the curve is checkpointed with the trainer, so the rows the killed attempt made
    # after its last checkpoint were replaced by the resumed attempt's.
    assert [int(r["step"]) for r in rows] == list(range(1, 91))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    with open(f"{root}/plots/beta/stage1.csv") as f:
        beta = [float(r["beta"]) for r in csv.DictReader(f)]
    assert beta[0] < 0.1 and beta[-1] == 1.0  # faded in over 960 of the images

    shown = json.loads(run(["dvc", "plots", "show", "--json"], root).stdout)
    # (this project has no ood stage: its plot folder is the one that may be missing)
    errors = [e for e in shown.get("errors", []) if os.path.exists(f"{root}/{e['source']}")]
    assert not errors, errors
    data = shown["data"]
    for s in (0, 1):
        assert data[f"plots/train/stage{s}.csv"][0]["type"] == "vega"
        for picture in ("samples", "chain"):
            assert data[f"plots/images/stage{s}/{picture}.png"][0]["type"] == "image"


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_the_registered_model_serves_energies(killed_and_resumed, tmp_path):
    from cfebm.data import PyramidStore

    root, _, _ = killed_and_resumed
    port = free_port()
    cmd = [os.path.join(BIN, "mlflow"), "models", "serve", "-m", "models:/cfebm-digits@latest",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    server = start(cmd, str(tmp_path), str(tmp_path / "serve.log"),
                   MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db")  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(answers(f"{url}/ping"), 180, "mlflow models serve", interval=0.5, proc=server)
        digits = np.asarray(PyramidStore(f"{root}/data/pyramid").read("test", 8)[:64])
        noise = np.random.default_rng(0).integers(0, 256, digits.shape, dtype=np.uint8)
        energies = {}
        for name, x in (("digits", digits), ("noise", noise)):
            status, body = _post(f"{url}/invocations", {"inputs": x.astype(np.uint8).tolist()})
            assert status == 200, body
            energies[name] = np.asarray(body["predictions"], dtype=np.float64)
            assert energies[name].shape == (len(x),) and np.isfinite(energies[name]).all()
        # lower energy = more likely: the data scores below uniform noise
        assert np.median(energies["noise"]) > np.percentile(energies["digits"], 90)
        for bad in (digits[:, :, :4, :4], digits.astype(np.float32) / 255):
            status, body = _post(f"{url}/invocations", {"inputs": bad.tolist()})
            assert 400 <= status < 500 and body.get("message"), (status, body)
    finally:
        kill_group(server)


@pytest.fixture(scope="module")
def experiment(killed_and_resumed) -> str:
    """The name of a DVC experiment run in a temporary copy with one parameter changed (of
    the evaluate stages), for the finest stage's evaluation: it alone runs again."""
    root, _, _ = killed_and_resumed
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "smoke pipeline"], root)
    name = "fewer-samples"
    done = run(["dvc", "exp", "run", "--temp", "-n", name, "-S", "evaluate.num_samples=32",
                "evaluate@1"],
               root, timeout=600, RAY_TMPDIR=RAY_TMP, AWS_SECRET_ACCESS_KEY=PLANTED[1])  # fmt: skip
    LOGS.append(done.stdout + done.stderr)
    return name


def test_dvc_exp_run_temp_logs_to_the_project_store(killed_and_resumed, experiment):
    from mlflow import MlflowClient

    root, _, _ = killed_and_resumed
    name = experiment
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    (exp_run,) = (
        r for e in shown for x in e.get("experiments") or [] for r in x["revs"] if r["name"] == name
    )
    data = exp_run["data"]
    assert data["params"]["params.yaml"]["data"]["evaluate"]["num_samples"] == 32
    # (no metrics/evaluate-stage0.json: the coarser stage's evaluation never ran)
    metrics = {k: v["data"] for k, v in data["metrics"].items() if "data" in v}
    assert metrics["metrics/evaluate-stage1.json"]["stage_1"]["num_samples"] == 32
    assert metrics["metrics/train-stage1.json"]["step"] == 90  # restored, not trained again

    # The temporary copy's stages logged to the project's store, named by the experiment.
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("cfebm")
    runs = client.search_runs([exp.experiment_id], f"tags.`cfebm.dvc_experiment` = '{name}'")
    kinds = sorted(r.data.tags["cfebm.kind"] for r in runs)
    assert kinds == ["pipeline", "stage"], kinds  # evaluate@1
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["evaluate.num_samples"] == "32"  # the stages', and the parent's
    assert not glob.glob(f"{root}/.dvc/tmp/exps/**/mlflow.db", recursive=True)


def _rendered(url: str, tmp_path, wait_ms: int = 20000) -> str:
    """The text of ``url`` as headless Chromium renders it (Debian's chromium), once the
    page's scripts ran."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed: `make test` installs Debian's package"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium'}", f"--virtual-time-budget={wait_ms}",
           "--window-size=1600,1200", "--dump-dom", url]  # fmt: skip
    dom = run(cmd, str(tmp_path), timeout=120).stdout
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def test_the_mlflow_ui_lists_the_runs_and_compares_two_pipelines(
    killed_and_resumed, experiment, tmp_path
):
    from mlflow import MlflowClient

    root, _, _ = killed_and_resumed
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("cfebm")
    parents = client.search_runs([exp.experiment_id], "tags.`cfebm.kind` = 'pipeline'")
    assert len(parents) == 2  # the repro, and the experiment
    port = free_port()
    ui = start([os.path.join(BIN, "mlflow"), "ui", "--backend-store-uri",
                f"sqlite:///{root}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1"], root, str(tmp_path / "ui.log"),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # as `make ui` starts it  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(answers(f"{url}/health"), 120, "mlflow ui", interval=0.5, proc=ui)
        # The experiment opens on its training runs (not on the GenAI traces overview),
        # with the pipeline runs as the rows (their stage runs nested under them).
        page = _rendered(f"{url}/#/experiments/{exp.experiment_id}/runs", tmp_path)
        every = client.search_runs([exp.experiment_id])
        assert "Training runs" in page and f"{len(every)} matching runs" in page
        for p in parents:
            assert p.info.run_name in page
        (stage,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'stage1-8x8'")
        page = _rendered(f"{url}/#/experiments/{exp.experiment_id}/runs/{stage.info.run_id}",
                         tmp_path)  # fmt: skip
        assert "stage1-8x8" in page and "train.sampler.step_size" in page and "loss" in page
        ids = json.dumps([p.info.run_id for p in parents])
        compare = _rendered(
            f"{url}/#/compare-runs?runs={urllib.parse.quote(ids)}"
            f"&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}",
            tmp_path,
        )
        assert "evaluate.num_samples" in compare  # the parameter that differs
        assert "evaluate/stage_1/fid_cfebm-digits-cnn" in compare
    finally:
        kill_group(ui)


def test_no_planted_secret_is_written_anywhere(killed_and_resumed, experiment):
    """Everything the runs wrote (outputs, DVC cache, checkpoints, the MLflow store and its
    artifacts, Ray's session logs, the console) is free of the planted credentials; only
    the user's own params.yaml holds one, and DVC's and git's records of it (dvc.lock,
    the experiments' snapshots in .dvc/tmp/exps, .git)."""
    root, _, _ = killed_and_resumed
    own, exps = {"params.yaml", "dvc.lock"}, os.path.join(root, ".dvc", "tmp", "exps")
    blobs = ["".join(LOGS).encode()]
    for folder in (root, RAY_TMP):
        for base, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != ".git" and os.path.join(base, d) != exps]
            for name in files:
                if base == root and name in own:
                    continue
                with contextlib.suppress(OSError), open(os.path.join(base, name), "rb") as f:
                    blobs.append(f.read())
    assert len(blobs) > 100  # outputs, cache, checkpoints, mlflow.db, mlruns, Ray logs
    for secret in PLANTED:
        leaks = sum(secret.encode() in b for b in blobs)
        assert leaks == 0, f"{secret} found in {leaks} file(s)"
    assert any("holds a credential" in log for log in LOGS)  # the user is told to move it
