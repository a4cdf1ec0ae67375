"""Reading and writing through fsspec URLs (local paths, ``file://``, ``s3://``, ...).

Writes are atomic where the filesystem allows it: a local file is written under a
temporary name and renamed, so a reader never sees half a file; object stores (S3)
only make an object visible once its upload completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in str(url) or str(url).startswith("file://")


S3_DEFAULTS = {
    "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 3, "mode": "standard"}},
}
"""botocore settings of s3fs unless ``storage_options`` give their own (with s3fs's own
retries lowered to 2): a wrong or unreachable endpoint fails within seconds instead of
retrying for a quarter of a minute."""


def absolute(url: str) -> str:
    """Local paths made absolute (workers run in another folder); URLs unchanged."""
    if is_local(url):
        return os.path.abspath(str(url).removeprefix("file://"))
    return str(url)


def fs_and_path(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` (with ``storage_options``) and the path in it."""
    options = dict(storage_options or {})
    s3 = str(url).startswith(("s3://", "s3a://"))
    if s3:
        options = {**S3_DEFAULTS, **options}
    fs, path = url_to_fs(str(url), **options)
    if s3 and "config_kwargs" not in (storage_options or {}):
        fs.retries = 2  # s3fs's retry loop around botocore's (5 by default)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join URL components with '/' (works for local paths and object-store URLs)."""
    url = str(url).rstrip("/")
    return "/".join([url, *(p.strip("/") for p in parts)])


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.isdir(path)


def read_bytes(url: str) -> bytes:
    """All bytes of ``url``; a missing object raises ``FileNotFoundError`` naming it."""
    fs, path = fs_and_path(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file or object: {url}") from e


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``url`` for writing so that it appears only once the write has finished.

    Local files go through a temporary sibling and ``os.replace``; other filesystems
    buffer in memory and upload on success (an S3 object is atomic by nature). On an
    exception nothing is left at ``url``.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    if is_local(url):
        path = str(url).removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        buf = io.BytesIO() if "b" in mode else io.StringIO()
        yield buf
        data = buf.getvalue()
        fs, path = fs_and_path(url)
        with fs.open(path, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_json(url: str, values) -> None:
    """``values`` as indented JSON (DVC metrics, a run's summary, a search's result)."""
    write_bytes(url, (json.dumps(values, indent=2) + "\n").encode())


def write_results(metrics_url: str, metrics: dict, folder: str, files: dict[str, bytes]) -> None:
    """A stage's metrics JSON (DVC metrics) and its pictures ``<folder>/<name>``."""
    write_json(metrics_url, metrics)
    for name, data in files.items():
        write_bytes(join(folder, name), data)


def write_csv(url: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """``rows`` as a CSV file with a header (``columns``: default, every key in order of
    appearance); missing values are empty."""
    import csv

    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(url, buf.getvalue().encode())


def content_key(value, length: int = 12) -> str:
    """A short sha256 of ``value`` as canonical JSON (sorted keys; other types by ``str``):
    the key of what a result depends on."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def local_file(data: bytes, suffix: str = "") -> str:
    """A local file holding ``data`` in the temporary folder, named by its hash (written
    once per machine): e.g. weights sent to a worker on another node."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"cfebm-{digest}{suffix}")
    if not os.path.exists(path):
        write_bytes(path, data)
    return path


def makedirs(url: str) -> None:
    fs, path = fs_and_path(url)
    fs.makedirs(path, exist_ok=True)


log = logging.getLogger(__name__)
STALE_REPORT_S = 60.0
"""A report folder of a process that no longer runs is removed once it is this old."""
_swept: set[str] = set()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: another user's process, running
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep_reports(kind: str) -> list[str]:
    """Remove ``cfebm-<kind>-<pid>-*`` folders in the temporary folder whose process no
    longer runs (a worker killed while it wrote a checkpoint) and that are older than
    :data:`STALE_REPORT_S`; returns what was removed."""
    prefix, root, removed = f"cfebm-{kind}-", tempfile.gettempdir(), []
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            if not pid.isdigit() or _running(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and (
                    now - entry.stat(follow_symlinks=False).st_mtime > STALE_REPORT_S
                ):
                    shutil.rmtree(entry.path)
                    removed.append(entry.path)
    return removed


@contextlib.contextmanager
def report_dir(kind: str) -> Iterator[str]:
    """A temporary folder for one report's checkpoint files (Ray copies them to the run's
    storage), named after this process; the first use in a process sweeps the folders that
    killed processes left (:func:`sweep_reports`)."""
    if kind not in _swept:
        _swept.add(kind)
        for path in sweep_reports(kind):
            log.info("removed %s, left by a process that no longer runs", path)
    with tempfile.TemporaryDirectory(prefix=f"cfebm-{kind}-{os.getpid()}-") as d:
        yield d
