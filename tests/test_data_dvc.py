"""The repository's own dvc.yaml: `dvc repro` of prepare + pyramid, and a DVC remote on S3.

Runs DVC and git as subprocesses in a temporary git repository holding copies of the
repository's dvc.yaml, params.yaml (with smoke-sized data settings), .dvcignore and code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from cfebm.data import PyramidStore

pytestmark = pytest.mark.slow  # runs git and DVC as subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SMOKE = {
    "prepare": {"source": "shapes", "num_train": 40, "num_test": 8, "shard_size": 16},
    "pyramid": {"coarsest": 4},
}


def sh(*cmd: str, cwd) -> str:
    """Run a command with the venv first on PATH; fail the test with its output."""
    env = {
        **os.environ,
        "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        "DVC_NO_ANALYTICS": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    env.pop("PYTHONPATH", None)  # stages must import the copies in the temporary repo
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode in a dependency must not matter
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(*args: str, cwd) -> str:
    return sh(os.path.join(BIN, "dvc"), *args, cwd=cwd)


def file_hashes(root) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(
                    fh.read()
                ).hexdigest()
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repository with the project's stage files, after `dvc repro pyramid`."""
    root = tmp_path_factory.mktemp("repo")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("cfebm", "pipelines"):
        shutil.copytree(os.path.join(REPO, name), root / name, ignore=ignore)
    shutil.copy(os.path.join(REPO, "dvc.yaml"), root / "dvc.yaml")
    shutil.copy(os.path.join(REPO, ".gitignore"), root / ".gitignore")
    with open(os.path.join(REPO, "params.yaml")) as f:
        params = yaml.safe_load(f)
    for section, values in SMOKE.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh("git", "config", "user.email", "tests@cfebm.invalid", cwd=root)
    sh("git", "config", "user.name", "cfebm tests", cwd=root)
    dvc("init", "-q", cwd=root)
    shutil.copy(os.path.join(REPO, ".dvcignore"), root / ".dvcignore")
    dvc("config", "core.analytics", "false", cwd=root)
    dvc("repro", "pyramid", cwd=root)
    return root


def test_repro_builds_the_pyramid_and_is_then_up_to_date(repo):
    store = PyramidStore(str(repo / "data" / "pyramid"))
    assert store.resolutions == [4, 8, 16] and store.channels == 3
    assert (store.count("train"), store.count("test")) == (40, 8)
    assert store.num_shards("train") == 3
    assert PyramidStore(str(repo / "data" / "prepared")).resolutions == [16]
    # The stages imported cfebm/data, writing __pycache__ into a dependency: still unchanged.
    assert (repo / "cfebm" / "data" / "__pycache__").is_dir()
    assert "up to date" in dvc("status", "prepare", "pyramid", cwd=repo)
    assert "didn't change" in dvc("repro", "pyramid", cwd=repo)


def test_push_to_s3_remote_and_pull_into_a_clone(repo, s3_env, s3_server, tmp_path):
    dvc("remote", "add", "-f", "-d", "storage", f"{s3_env}/dvcstore", cwd=repo)
    dvc("remote", "modify", "storage", "endpointurl", s3_server, cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "smoke pipeline", cwd=repo)
    dvc("push", "prepare", "pyramid", cwd=repo)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data").exists()
    dvc("pull", "prepare", "pyramid", cwd=clone)
    for out in ("prepared", "pyramid"):
        pulled = file_hashes(clone / "data" / out)
        assert pulled == file_hashes(repo / "data" / out) and len(pulled) > 5
    assert "up to date" in dvc("status", "prepare", "pyramid", cwd=clone)
