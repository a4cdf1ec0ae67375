"""Shared fixtures: a local S3 (moto) for every test that needs object storage."""

from __future__ import annotations

import getpass
import logging
import os
import socket
import tempfile
import uuid

import pytest

# The test processes (make test: -n 3) and the stages they start share the machine's cores:
# one OpenMP thread each, unless a test sets its own. With two, every small parallel region
# of a tiny training waits for its partner thread to be scheduled among dozens of busy
# processes (a test that takes 0.5 s alone took 27 s in the suite).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile's kernels built in the test process, not by a pool of compile workers: each
# worker imports torch first, and with every core busy the pool only adds that work (the
# compiled-chain test from a cold cache: 46 CPU-s with the pool, 36 without, on 2 cores).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# torch.compile's kernel cache, one per setting of the CPU kernels (the slow kind is emulated
# on a fast machine with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA): with one shared cache,
# after suite runs capped at AVX2, a run without the cap aborted in a compiled energy (torch
# 2.14.1, one thread both times); with a cache of its own it passed.
_KERNELS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"torchinductor_{getpass.getuser()}",
        "cfebm-" + "-".join(os.environ.get(k, "default").lower() for k in _KERNELS),
    ),
)

LONGEST = (
    "test_train_dvc.py",
    "test_train_cluster.py",
    "test_infra.py",
    "test_bench_smoke.py",
    "test_tune.py",
)
"""The longest files (each 1.5-6 minutes; see ``--durations``), longest first."""


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with slow (end-to-end) tests, then the
    rest, each file's tests in their order. That is the order of a run without xdist; with
    ``-n N --dist loadfile`` (``make test``) pytest-xdist hands out the files with the most
    tests first, and this order only breaks ties. That keeps the end-to-end files (few tests
    each) apart, which is faster: with ``--no-loadscope-reorder`` the three longest started
    together and each took 2-2.4x as long (suite 679 s against 642 s on 2 AMD EPYC cores)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        if item.path.name in LONGEST:
            return LONGEST.index(item.path.name)
        return len(LONGEST) + (item.path not in slow)

    items.sort(key=rank)  # stable: the order within a file is kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    Real s3fs / botocore / DVC talk to it over HTTP, nothing is patched. Use ``s3_env``
    to point the AWS environment variables at it.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS environment for the moto server (also inherited by subprocesses) and a new bucket.

    Yields ``s3://<bucket>``. Credential files and the EC2 metadata lookup are switched
    off, so botocore sees exactly these variables and nothing from the machine.
    """
    import s3fs

    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(os.sep, "nonexistent", "credentials"),
        "AWS_CONFIG_FILE": os.path.join(os.sep, "nonexistent", "config"),
        **S3_CREDENTIALS,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # instances cache the environment they saw
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


# Small data sets and trained smoke models for the uses of the energy (restore, ood,
# translate): session fixtures defined in tests/fixtures_models.py.
from fixtures_models import (  # noqa: E402, F401
    digits_data,
    digits_model,
    one_thread,
    shapes_data,
    shapes_translator,
)
