"""Ray plumbing for the training stages: join or start Ray, check where data and
checkpoints live, and what the workers inherit.

Multi-node rule: every path a worker reads or writes must be visible on every node; a
local run storage is refused and a local dataset copied into the run storage
(:func:`cfebm.data.store.check_paths`, :func:`~cfebm.data.store.dataset_for_workers`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from cfebm import io as cio
from cfebm.config import ConfigError
from cfebm.data.storage import filesystem
from cfebm.data.store import check_paths, dataset_for_workers
from cfebm.redact import public_env

# Environment that workers on other nodes need (credentials and endpoints of the object
# store and the tracking server, cache folders, allocator settings).
ENV_PREFIXES = ("AWS_", "MLFLOW_TRACKING_", "CFEBM_")
ENV_NAMES = ("GLIBC_TUNABLES", "TORCHINDUCTOR_CACHE_DIR")


def connect(address: str | None = None, local_cpus: int | None = None) -> str:
    """Join the Ray cluster at ``address`` or ``RAY_ADDRESS``; else start a local Ray.

    Returns a line saying which. A local Ray is private to this process (``address=
    "local"``), so it never joins another user's cluster on a shared machine.
    """
    import ray

    if ray.is_initialized():
        return "using the Ray already initialised in this process"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"joined the Ray cluster at {address}"
    # Ray's own helper actors find "their" cluster through RAY_ADDRESS (else by scanning
    # the machine, which fails when other users run Ray on it too): fix the GCS port of
    # the new local Ray and export its address before its processes start.
    port = free_port()
    _ENV_BEFORE.update(os.environ)
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    # Ray runs its workers at nice 15: on a machine shared with other work the training
    # would then get a fraction of the CPU that the same loop gets outside Ray.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # The preemption watcher (one more actor process per training run) serves spot
    # instances of a cloud cluster, not a Ray on this machine.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    ray.init(
        address="local",
        num_cpus=local_cpus,
        include_dashboard=True,  # Ray Train's helper actors query the state API through it
        dashboard_port=free_port(),
        log_to_driver=True,
    )
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"started a local Ray with {cpus} CPU(s) (set RAY_ADDRESS to use a cluster)"


_ENV_BEFORE: dict[str, str] = {}


def disconnect() -> None:
    """``ray.shutdown()``, and the environment as it was before :func:`connect` started a
    local Ray (without the address it exported)."""
    import ray

    ray.shutdown()
    if _ENV_BEFORE:
        os.environ.clear()
        os.environ.update(_ENV_BEFORE)
        _ENV_BEFORE.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ray_storage(url: str, storage_options: dict | None = None) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    Local folders are passed as absolute paths; any other fsspec URL goes through fsspec
    (``pyarrow.fs.PyFileSystem(FSSpecHandler(fs))``), so s3:// honours the same
    ``AWS_*`` variables and ``storage_options`` as the rest of cfebm.
    """
    if cio.is_local(url):
        path = cio.absolute(url)
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs

    fs, path = filesystem(url, storage_options)
    fs.makedirs(path, exist_ok=True)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables passed to the workers (they may start on nodes that lack them): never a
    credential, which Ray would record with the run (:func:`cfebm.redact.public_env`)."""
    environ = os.environ if environ is None else environ
    return public_env(dict(environ), ENV_PREFIXES, ENV_NAMES)


@dataclass
class ClusterOptions:
    """Where a Ray job runs and keeps its checkpoints (``train.ray``, ``tune.ray``)."""

    address: str | None = None
    """Ray cluster to join; null: ``RAY_ADDRESS`` if set, else start a local Ray."""
    local_cpus: int | None = None
    """CPUs of a Ray started locally (null: all of this machine's)."""
    storage: str = "runs/ray"
    """Run storage (checkpoints, outside DVC's outputs): a local folder, or s3://... on a
    cluster."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``storage`` (e.g. endpoint_url); s3fs also reads AWS_* variables."""
    shared_filesystem: bool = False
    """Local paths are on a filesystem every node mounts (NFS): allows local ``storage``
    and data on a multi-node cluster."""
    max_failures: int = 3
    """Times Ray restarts the work from its last checkpoint after a failure (-1: always)."""
    keep_checkpoints: int | None = 3
    """Checkpoints kept (the newest); null: all."""

    def __post_init__(self) -> None:
        if self.max_failures < -1 or (
            self.keep_checkpoints is not None and self.keep_checkpoints < 1
        ):
            raise ConfigError("max_failures must be >= -1 and keep_checkpoints >= 1 or null")


@dataclass
class Placement:
    """Where a Ray job's workers run and what they read and write."""

    connected: str
    """How Ray was joined or started (a line for the console)."""
    nodes: int
    data_url: str
    """The dataset as the workers read it (a copy in the storage on a multi-node cluster)."""
    storage: str
    """The run storage, local paths made absolute."""
    storage_path: str
    storage_fs: Any
    """``storage_path`` and ``storage_filesystem`` for Ray's RunConfig."""


def place(opts: ClusterOptions, data: str, data_options: dict, what: str) -> Placement:
    """Join or start Ray, check that ``opts.storage`` (named ``what`` in errors) is
    reachable by every node, and make the dataset readable by every worker."""
    import ray

    connected = connect(opts.address, opts.local_cpus)
    nodes = sum(bool(n.get("Alive")) for n in ray.nodes())
    storage, shared = cio.absolute(opts.storage), opts.shared_filesystem
    check_paths(nodes, {what: storage}, shared)
    data_url = dataset_for_workers(data, storage, nodes, shared, data_options, opts.storage_options)
    path, fs = ray_storage(storage, opts.storage_options)
    return Placement(connected, nodes, data_url, storage, path, fs)
