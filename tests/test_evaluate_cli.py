"""The features and evaluate stages through their command lines (main() with the arguments
DVC passes, in this process: tests/test_train_dvc.py runs both as DVC does, in processes of
their own) and their library paths, on a tiny digits pyramid and tiny two-stage checkpoints
made here."""

import contextlib
import importlib
import json

import numpy as np
import pytest
import torch
import yaml
from fixtures_models import torch_threads
from PIL import Image

from cfebm.checkpoint import save_checkpoint
from cfebm.config import CFEBMConfig, ModelConfig, SamplerConfig, TrainConfig
from cfebm.data import PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare
from cfebm.features import load_feature_net
from cfebm.loop import fit
from cfebm.metrics import MetricsConfig
from cfebm.trainer import Trainer
from pipelines import tracking
from pipelines.evaluate import EvaluateStage
from pipelines.evaluate import main as evaluate_main
from pipelines.evaluate import run as evaluate_run

NAME = "cfebm-digits-cnn"


def run(module: str, *args: str, cwd) -> None:
    """``python -m <module> <args>`` in ``cwd``, through the module's main() here; a failure
    is its SystemExit with the one-line message."""
    with contextlib.chdir(cwd), torch_threads(1):
        importlib.import_module(module).main(list(args))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A project folder: digits pyramid (8 -> 4), stage 0 and stage 1 checkpoints."""
    root = tmp_path_factory.mktemp("project")
    prepare(PrepareConfig(source="digits", out=str(root / "prepared"), resolution=8))
    build_pyramid(PyramidConfig(input=str(root / "prepared"), out=str(root / "pyr"), coarsest=4))
    store = PyramidStore(str(root / "pyr"))
    data = {r: torch.from_numpy(np.array(store.read("train", r))) for r in (4, 8)}
    cfg = CFEBMConfig(
        model=ModelConfig(channels=1, resolutions=(4, 8), base_width=4),
        sampler=SamplerConfig(steps=3),
        train=TrainConfig(batch_size={4: 16}, fade_images=32, stable_images=32),
    )
    trainer = Trainer(cfg, data)
    fit(trainer, until_stage=0)
    save_checkpoint(trainer.model_state(), str(root / "models" / "stage0" / "model.pt"))
    trainer.advance_stage()
    fit(trainer)
    save_checkpoint(trainer.model_state(), str(root / "models" / "stage1" / "model.pt"))
    return root


@pytest.fixture(scope="module")
def features(workdir):
    """The features stage CLI: trains the extractor, writes weights + metrics."""
    run(
        "pipelines.features",
        "--data", "pyr", "--out", "models/features.pt", "--metrics", "metrics/features.json",
        "--epochs", "3", "--width", "8", "--feature_dim", "16",
        cwd=str(workdir),
    )  # fmt: skip
    return workdir / "models" / "features.pt"


def test_features_stage_writes_weights_and_accuracy(features, workdir):
    loaded = load_feature_net(str(features))
    assert loaded.name == NAME
    assert loaded.meta["dataset"] == "digits" and loaded.meta["resolution"] == 8
    assert loaded.meta["channels"] == 1 and loaded.meta["resolutions"] == [4, 8]
    metrics = json.loads((workdir / "metrics" / "features.json").read_text())
    assert set(metrics["test_accuracy"]) == {"r8", "r4"}
    assert metrics["test_accuracy"]["r8"]["class"] > 0.3  # 3 tiny epochs; chance is 0.1
    assert metrics["test_accuracy"] == loaded.meta["test_accuracy"]


def test_evaluate_writes_nested_dvc_metrics_and_grids(features, workdir):
    params = workdir / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "evaluate": {
                    "models": ["models/stage0/model.pt", "models/stage1/model.pt"],
                    "data": "pyr",
                    "num_samples": 30,
                    "sample_batch": 16,
                    "features": "models/features.pt",
                    "metrics": {"kid_subsets": 5},
                    "mlflow": {"enabled": True},
                }
            }
        )
    )
    run(
        "pipelines.evaluate", "--params", "params.yaml", "--mlflow.enabled", "false",
        "--num_reference", "100", "--grid_count", "9",
        cwd=str(workdir),
    )  # fmt: skip
    results = json.loads((workdir / "metrics" / "evaluate.json").read_text())
    assert list(results) == ["stage_0", "stage_1"]
    assert results["stage_0"]["resolution"] == 4 and results["stage_1"]["resolution"] == 8
    for stage in results.values():
        assert stage["num_samples"] == 30 and stage["num_reference"] == 100
        for m in ("fid", "kid_mean", "kid_std", "precision", "recall", "f_score"):
            assert np.isfinite(stage[f"{m}_{NAME}"])
        assert stage[f"fid_{NAME}"] > 0
    for s in (0, 1):
        grid = Image.open(workdir / "outputs" / "evaluate" / f"stage_{s}.png")
        assert grid.size[0] > 3 * 4  # 3 columns of enlarged samples


def test_evaluate_same_seed_same_numbers(features, workdir, monkeypatch):
    """In-process (the library path of the stage): two runs with one seed agree exactly."""
    monkeypatch.chdir(workdir)
    outs = []
    for name in ("a.json", "b.json"):
        params = EvaluateStage(
            models=["models/stage1/model.pt"],
            data="pyr",
            num_samples=20,
            features="models/features.pt",
            metrics=MetricsConfig(kid_subsets=3),
            out=name,
            grids="g",
            mlflow=tracking.TrackingOptions(enabled=False),
        )
        with torch.random.fork_rng():
            torch.manual_seed(len(name) + ord(name[0]))  # the global RNG must not matter
            outs.append(evaluate_run(params, log=lambda *_: None))
    assert outs[0] == outs[1]
    assert json.loads((workdir / "a.json").read_text()) == outs[0]


def test_evaluate_inception_without_weights_fails_before_sampling(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (workdir / "none.yaml").write_text("{}\n")
    argv = [
        "--models", "[models/stage1/model.pt]", "--data", "pyr",
        "--extractors", "[inception-v3-compat]", "--inception_weights", "missing/inception.pth",
        "--mlflow.enabled", "false", "--out", "never.json", "--params", "none.yaml",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        evaluate_main(argv)
    assert "Inception weights file missing/inception.pth does not exist" in str(e.value)
    assert not (workdir / "never.json").exists()


def test_mlflow_gets_metrics_and_grids(features, workdir, monkeypatch):
    """A nested ``evaluate`` run with ``stage_<s>/<metric>_<extractor>`` metrics, the grids,
    the metrics JSON and the settings under their params.yaml names."""
    from mlflow import MlflowClient

    monkeypatch.chdir(workdir)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    uri = f"sqlite:///{workdir}/mlflow.db"
    params = EvaluateStage(
        models=["models/stage0/model.pt"], data="pyr", num_samples=20,
        features="models/features.pt", metrics=MetricsConfig(kid_subsets=3, prc=False),
        out="m.json", grids="g", mlflow=tracking.TrackingOptions(tracking_uri=uri, experiment="t"),
    )  # fmt: skip
    results = evaluate_run(params, log=lambda *_: None)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                "tags.`cfebm.kind` = 'stage'")  # fmt: skip
    assert run.data.metrics[f"stage_0/fid_{NAME}"] == pytest.approx(
        results["stage_0"][f"fid_{NAME}"]
    )
    assert run.data.params["evaluate.num_samples"] == "20"
    assert run.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert files == {"evaluate/stage_0.png", "evaluate/metrics.json"}
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
