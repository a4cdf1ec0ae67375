"""Secrets never land in what the project writes: a credential planted in a source URL
(user:password@, a pre-signed query), in storage options and in a CLI override is found
in no manifest, log line, dry-run or error message (the training stages' routes into
MLflow, checkpoints and Ray are checked by tests/test_train_dvc.py)."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml
from data_fixtures import cifar_batch, write_cifar_archive

from cfebm.redact import public_env, redact, redact_text, secret_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRETS = ("pw-PLANTED-1", "sig-PLANTED-2", "tok-PLANTED-3", "key-PLANTED-4")


def everything_under(folder) -> bytes:
    out = b""
    for base, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                out += f.read()
    return out


@pytest.fixture
def archive_server(tmp_path):
    """An HTTP server on 127.0.0.1 that serves a small CIFAR-10 archive whatever the
    credentials and query of the request."""
    rng = np.random.default_rng(0)
    www = tmp_path / "www"
    www.mkdir()
    write_cifar_archive(str(www / "cifar-10-python.tar.gz"), [cifar_batch(rng, 40)],
                        cifar_batch(rng, 10), [f"c{i}" for i in range(10)])  # fmt: skip
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def cli(module: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{module}", *args], cwd=cwd, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300,
    )  # fmt: skip


def test_secrets_in_urls_options_and_overrides_are_written_nowhere(archive_server, tmp_path):
    pw, sig, tok, key = SECRETS
    url = f"http://user:{pw}@{archive_server}/cifar-10-python.tar.gz?X-Amz-Signature={sig}"
    work = tmp_path / "work"
    work.mkdir()
    params = {
        "prepare": {"source": "cifar10", "url": url, "out": "data/prepared", "resolution": 8},
        "pyramid": {"input": "data/prepared", "out": "data/pyramid", "coarsest": 4},
        "train": {"data_storage_options": {"token": tok}},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    logs = []
    for module, args in (
        ("prepare", ["--params", "params.yaml"]),
        ("pyramid", ["--params", "params.yaml"]),
        ("prepare", ["--params", "params.yaml", "--dry-run"]),
        (
            "train",
            [
                "--params",
                "params.yaml",
                "--stage",
                "0",
                "--dry-run",
                "--ray.storage_options",
                f'{{"secret": "{key}"}}',
            ],
        ),  # fmt: skip
        # an error that quotes the URL: the pyramid's input does not exist
        ("pyramid", ["--input", url.replace("cifar-10", "missing"), "--out", "x"]),
    ):
        done = cli(module, args, work)
        logs.append(done.stdout + done.stderr)
    assert all("Traceback" not in log for log in logs), logs
    assert (work / "data/pyramid/manifest.json").exists()
    assert "holds a credential" in logs[0]  # the user is told to move it to the env
    assert "***" in logs[2] and "***" in logs[3]
    written = everything_under(work / "data") + "".join(logs).encode()
    for secret in SECRETS:
        assert secret.encode() not in written, secret
    # what stays is useful: the host and path of the source, the names of the keys
    manifest = (work / "data/prepared/manifest.json").read_text()
    assert archive_server in manifest and "X-Amz-Signature=***" in manifest


def test_redaction_rules():
    assert redact_text(f"see s3://b/x and https://u:{SECRETS[0]}@h/p?token={SECRETS[2]} ok") == (
        "see s3://b/x and https://u:***@h/p?token=*** ok"
    )
    assert redact({"storage_options": {"key": "AKIA", "endpoint_url": "http://h"}}) == {
        "storage_options": {"key": "***", "endpoint_url": "http://h"}
    }
    found = secret_keys({"a": {"secret": "x", "url": "https://u:p@h"}, "b": [{"token": ""}]})
    assert found == ["a.secret", "a.url"]
    env = {"AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "AWS_ENDPOINT_URL": "http://h",
           "MLFLOW_TRACKING_PASSWORD": "p", "CFEBM_STORAGE": "s3://b", "HOME": "/root"}  # fmt: skip
    assert public_env(env, ("AWS_", "MLFLOW_TRACKING_", "CFEBM_")) == {
        "AWS_ENDPOINT_URL": "http://h",
        "CFEBM_STORAGE": "s3://b",
    }


def test_urls_without_secrets_are_left_exactly_as_they_are():
    from cfebm.redact import redact_url

    for url in ("sqlite:////tmp/x/mlflow.db", "file:///a/b", "s3://b/k?versionId=3",
                "http://127.0.0.1:5000", "memory://cfebm/x"):  # fmt: skip
        assert redact_url(url) == url
