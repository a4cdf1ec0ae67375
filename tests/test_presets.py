"""``make run PRESET=...`` and the overlays of cluster jobs (pipelines/run.py): a preset is
laid over the committed settings so that DVC records what ran, whole where a table is keyed
by resolution; mistakes are refused before anything runs. (The cifar10-smoke preset runs end
to end in tests/test_infra.py, on the local cluster.)"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml
from train_fixtures import train_dry_run

from cfebm.config import from_dict
from pipelines import run as launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout with the repository's params.yaml committed and its presets."""
    shutil.copy(os.path.join(REPO, "params.yaml"), tmp_path / "params.yaml")
    shutil.copytree(os.path.join(REPO, "presets"), tmp_path / "presets")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "params.yaml"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "params"],
    ):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["cifar10", "cifar10-smoke", "celeba64"])
def test_each_preset_gives_valid_training_options(checkout, name):
    header = launcher.apply_preset(name, "s3://bucket/data")
    assert header.startswith(f"{launcher.MARK}{name}") and "s3://bucket/data" in header
    params = load("params.yaml")
    preset = load(f"presets/{name}.yaml")
    assert params["prepare"]["url"] == "s3://bucket/data"
    # Tables keyed by resolution are the preset's, not a mix with the default's keys.
    for key in ("batch_size", "lr", "images"):
        assert params["train"]["optim"][key] == preset["train"]["optim"][key], key
    assert params["train"]["stages"] == preset["train"]["stages"]
    assert params["train"]["model"]["network"] == "release"
    # The release's chain: K steps in every stage, every batch (no per-stage K, no bank).
    cfg = from_dict({"sampler": params["train"]["sampler"], "train": params["train"]["optim"]})
    k = preset["train"]["sampler"]["steps"]
    assert [cfg.sampler.k(s) for s in range(3)] == [k, k, k]
    assert cfg.train.coarse_bank == 0
    # The defaults that the preset leaves alone stay.
    assert (
        params["train"]["loop"]["max_rollbacks"]
        == load(f"{REPO}/params.yaml")["train"]["loop"]["max_rollbacks"]
    )
    # The training stage accepts the result (types and values checked, as in a run).
    resolved = train_dry_run(str(checkout))
    assert resolved["model"]["resolutions"] == preset["train"]["model"]["resolutions"]


def test_a_preset_again_replaces_the_first_and_plain_run_notes_it(checkout):
    launcher.apply_preset("cifar10-smoke", "a.tar.gz")
    launcher.apply_preset("cifar10", "b.tar.gz")  # a preset's own params.yaml may be replaced
    assert load("params.yaml")["train"]["model"]["base_width"] == 32
    with open("params.yaml") as f:
        assert f.readline().startswith(f"{launcher.MARK}cifar10 (data: b.tar.gz)")


def test_edits_of_your_own_are_never_overwritten(checkout):
    with open("params.yaml", "a") as f:
        f.write("\n# my change\n")
    before = (checkout / "params.yaml").read_text()
    with pytest.raises(SystemExit, match="changes of your own"):
        launcher.apply_preset("cifar10", "x.tar.gz")
    assert (checkout / "params.yaml").read_text() == before


def test_a_preset_that_reads_your_data_needs_it_and_unknown_presets_are_named(checkout):
    with pytest.raises(SystemExit, match="give DATA="):
        launcher.apply_preset("cifar10", None)
    with pytest.raises(SystemExit, match="no preset 'cifar100'; presets: celeba64, cifar10"):
        launcher.apply_preset("cifar100", None)
    assert not (checkout / "params.yaml").read_text().startswith(launcher.MARK)


def test_overlays_and_sets_use_the_same_merge(checkout):
    launcher.overlay_params(
        [os.path.join(REPO, "tests", "params_smoke.yaml"), "presets/cifar10-smoke.yaml"],
        ["train.ray.workers=2", "train.ray.resources_per_worker={CPU: 1}", "prepare.url=s3://b/c"],
        log=lambda _: None,
    )
    params = load("params.yaml")
    preset = load("presets/cifar10-smoke.yaml")
    assert params["train"]["optim"]["images"] == preset["train"]["optim"]["images"]  # whole
    assert params["train"]["ray"]["workers"] == 2
    assert params["train"]["ray"]["resources_per_worker"] == {"CPU": 1}
    assert params["prepare"]["url"] == "s3://b/c"
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        launcher.overlay_params([], ["train.ray.workers"], log=lambda _: None)
