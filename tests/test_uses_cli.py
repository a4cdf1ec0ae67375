"""The stages of the energy's uses as a user runs them: ``python -m pipelines.restore``,
``pipelines.ood`` and ``pipelines.translate`` as subprocesses on tiny real data (a second
run, and the option checks, through the same main() in this process)."""

from __future__ import annotations

import importlib
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from fixtures_models import torch_threads

from cfebm.checkpoint import load_checkpoint
from cfebm.config import ConfigError
from cfebm.data import PyramidStore, to_unit_range
from cfebm.metrics import MetricsConfig
from cfebm.sampling import to_uint8
from cfebm.trainer import model_from_checkpoint
from cfebm.translate import Fidelity, fidelity_metrics
from cfebm.translate import translate as translate_images
from pipelines import ood, restore, translate

PNG = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(stage: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{stage}", *args],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": ROOT},
        cwd=cwd,
    )


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


@pytest.mark.parametrize("stage", ["restore", "ood", "translate"])
def test_help_explains_every_option(stage, capsys):
    module = importlib.import_module(f"pipelines.{stage}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--params", "--dry-run", "--device", "--threads", "--mlflow.enabled", "--seed"):
        assert option in text
    assert text.count("default:") > 10  # the values in effect are shown


def test_restore_cli_writes_metrics_and_grids(digits_model, digits_data, tmp_path):
    metrics, images = tmp_path / "m" / "restore.json", tmp_path / "img"
    r = run(
        "restore",
        *("--model", digits_model.checkpoint, "--data", digits_data),
        *("--metrics", str(metrics), "--images", str(images)),
        *("--num_images", "48", "--masks", "[centre, pixels]", "--noise_sigma", "0.5"),
        *("--denoise_chain.steps", "5", "--threads", "1", "--mlflow.enabled", "false"),
        *("--mode", "posterior"),
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(metrics.read_text())
    assert m["num_images"] == 48 and m["resolution"] == 8
    assert set(m) >= {"denoise", "inpaint_centre", "inpaint_pixels"} and "inpaint_boxes" not in m
    for task in ("denoise", "inpaint_centre", "inpaint_pixels"):
        assert m[task]["psnr_restored"] > m[task]["psnr_corrupted"], (task, m[task])
        assert is_png(images / f"{task}.png")


def test_params_file_and_command_line_resolve(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    section = {"model": "a.pt", "noise_sigma": 0.2, "denoise_chain": {"steps": 7}}
    params.write_text(yaml.safe_dump({"restore": section}))
    argv = ["--params", str(params), "--dry-run", "--denoise_chain.step_size", "0.1"]
    restore.main([*argv, "--fidelity", "0", "--masks", "[boxes]"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"] == "a.pt" and resolved["noise_sigma"] == 0.2
    assert resolved["fidelity"] == 0 and resolved["masks"] == ["boxes"]
    assert resolved["denoise_chain"]["steps"] == 7 and resolved["denoise_chain"]["step_size"] == 0.1
    params.write_text(yaml.safe_dump({"restore": {"nosie_sigma": 0.2}}))
    with pytest.raises(SystemExit, match="nosie_sigma"):
        restore.main(["--params", str(params), "--dry-run"])
    # translate: the translator's network, sampler and optimiser, dotted
    params.write_text(yaml.safe_dump({"translate": {"optim": {"seed": 5}}}))
    translate.main(["--params", str(params), "--dry-run", "--sampler.steps", "4"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["seed"] == 5 and resolved["sampler"]["steps"] == 4
    assert resolved["model"]["resolutions"] == [4, 8, 16]
    ood.main(["--dry-run", "--other", "{x: /data/x, y: s3://b/y}", "--sets", "[uniform]"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["other"] == {"x": "/data/x", "y": "s3://b/y"} and resolved["sets"] == [
        "uniform"
    ]


def test_ood_cli_writes_auroc_per_set_and_plots_and_logs_to_mlflow(
    digits_model, digits_data, shapes_data, tmp_path
):
    metrics, images = tmp_path / "ood.json", tmp_path / "img"
    r = run(
        "ood",
        *("--model", digits_model.checkpoint, "--data", digits_data),
        *("--other", f"{{shapes: {shapes_data['a']}}}", "--num_images", "200"),
        *("--metrics", str(metrics), "--images", str(images), "--threads", "1"),
        cwd=tmp_path,  # MLflow: the default sqlite:///mlflow.db store, here
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(metrics.read_text())
    assert set(m["auroc"]) == {"uniform", "constant", "interpolation", "shapes", "mean"}
    assert m["auroc"]["uniform"] > 0.9 and m["num_in"] == 200
    assert set(m["energy_mean"]) == {"in", "uniform", "constant", "interpolation", "shapes"}
    for name in ("roc.png", "energy_hist.png", "sets.png"):
        assert is_png(images / name)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        logged = dict(db.execute("SELECT key, value FROM metrics"))
        runs = [name for (name,) in db.execute("SELECT name FROM runs")]
    assert logged["auroc/uniform"] == pytest.approx(m["auroc"]["uniform"])
    assert logged["auroc/mean"] == pytest.approx(m["auroc"]["mean"])
    assert "ood" in runs
    pngs = {p.name for p in (tmp_path / "mlruns").rglob("*.png")}
    assert {"roc.png", "energy_hist.png", "sets.png"} <= pngs


def test_translate_cli_trains_writes_and_resumes(shapes_data, tmp_path, capsys):
    out = tmp_path / "t"
    args = (
        *("--source", shapes_data["a"], "--target", shapes_data["b"]),
        *("--model.resolutions", "[4, 8]", "--model.base_width", "4", "--sampler.steps", "3"),
        *("--optim.batch_size", "{4: 16}", "--optim.fade_images", "64"),
        *("--optim.stable_images", "128", "--optim.images", "{4: 128}", "--num_images", "32"),
        *("--model_out", str(out / "model.pt"), "--checkpoint", str(out / "last.pt")),
        *("--metrics", str(out / "translate.json"), "--images", str(out / "img")),
        *("--threads", "1", "--mlflow.enabled", "false"),
    )
    r = run("translate", *args)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "translate.json").read_text())
    for key in (
        "structure_ssim",
        "mask_iou",
        "colour_distance_source",
        "colour_distance_translation",
        "saliency_corr_change",
        "saliency_corr_gradient",
    ):
        assert isinstance(m[key], float), key
    assert m["resolution"] == 8 and m["num_images"] == 32 and m["train_steps"] == 8 + 12
    model = model_from_checkpoint(load_checkpoint(str(out / "model.pt")))
    assert model.stage == 1 and model.cfg.channels == 3
    for name in ("translation.png", "saliency.png"):
        assert is_png(out / "img" / name)
    # The same config and data (through the same main(), in this process): continues the
    # finished run.
    with torch_threads(1):
        translate.main(list(args))
    assert "resumed from" in capsys.readouterr().out
    # nothing more to train: the same model, and the metrics count the model's steps
    assert json.loads((out / "translate.json").read_text())["train_steps"] == 8 + 12
    same = model_from_checkpoint(load_checkpoint(str(out / "model.pt")))
    for (k, a), b in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), k


def test_translation_fid_and_kid_against_the_target_domain(
    shapes_translator, shapes_data, tmp_path
):
    from cfebm.features import FeatureNet, FeatureNetConfig, save_feature_net
    from cfebm.metrics import metric_key

    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(channels=3, resolution=8, num_classes=(5, 8), width=4))
    weights = str(tmp_path / "features.pt")
    save_feature_net(net.eval(), weights, "cfebm-shapes-test-cnn")
    fidelity = Fidelity(
        extractors=["domain"],
        features=weights,
        metrics=MetricsConfig(prc=False, kid_subsets=10, kid_subset_size=50),
    )
    source = to_unit_range(PyramidStore(shapes_data["a"]).read("test", 8))
    target = np.array(PyramidStore(shapes_data["b"]).read("test", 8))
    model, cfg = shapes_translator.model, shapes_translator.cfg
    with torch_threads(1):
        y = translate_images(model, source, cfg.sampler, generator=torch.Generator().manual_seed(0))
    quiet = {"device": "cpu", "log": lambda _: None}
    m = fidelity_metrics(fidelity, to_uint8(y).numpy(), target, **quiet)
    before = fidelity_metrics(fidelity, to_uint8(source).numpy(), target, **quiet)
    fid = metric_key("fid", "cfebm-shapes-test-cnn")
    assert set(m) == {
        fid,
        metric_key("kid_mean", "cfebm-shapes-test-cnn"),
        metric_key("kid_std", "cfebm-shapes-test-cnn"),
    }
    assert m[fid] < before[fid]  # translations are nearer the target domain than the sources
    same = fidelity_metrics(fidelity, target, target, **quiet)
    assert same[fid] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="weights file"):
        fidelity_metrics(Fidelity(extractors=["domain"]), target, target, "cpu")
