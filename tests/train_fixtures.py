"""Helpers for the training tests: smoke projects, subprocesses, an MLflow server, Ray."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

from pipelines.run import merge  # the merge of presets and overlays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SMOKE = os.path.join(REPO, "tests", "params_smoke.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_params(**train_changes) -> dict:
    """params.yaml merged with tests/params_smoke.yaml and then ``train_changes``."""
    with open(os.path.join(REPO, "params.yaml")) as f:
        params = yaml.safe_load(f)
    with open(SMOKE) as f:
        params = merge(params, yaml.safe_load(f))
    params["train"] = merge(params["train"], train_changes)
    return params


TRAINING_STAGES = ("prepare", "pyramid", "train")


def training_pipeline(names=TRAINING_STAGES) -> dict:
    """The repository's dvc.yaml reduced to the stages ``names`` (default: the data and
    training stages)."""
    with open(os.path.join(REPO, "dvc.yaml")) as f:
        dvc = yaml.safe_load(f)
    stages = {k: v for k, v in dvc["stages"].items() if k in names}
    train = stages["train"]["do"]
    train["deps"] = [d for d in train["deps"] if "${tune." not in d and "tune_" not in d]
    train["params"] = [p for p in train["params"] if "tune" not in p]
    return {**dvc, "stages": stages}


def make_project(root, params: dict, git: bool = True, stages=TRAINING_STAGES) -> str:
    """A copy of the project's code and its ``stages`` (default: the data and training
    stages) in ``root``, with ``params``; with ``git`` also a git + DVC repository, as a
    user's checkout is."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("cfebm", "pipelines", "presets"):
        shutil.copytree(os.path.join(REPO, name), os.path.join(root, name), ignore=ignore)
    os.makedirs(os.path.join(root, "tune"), exist_ok=True)
    shutil.copy(os.path.join(REPO, "tune", "untuned.json"), os.path.join(root, "tune"))
    shutil.copy(os.path.join(REPO, ".gitignore"), os.path.join(root, ".gitignore"))
    with open(os.path.join(root, "dvc.yaml"), "w") as f:
        yaml.safe_dump(training_pipeline(stages), f, sort_keys=False)
    with open(os.path.join(root, "params.yaml"), "w") as f:
        yaml.safe_dump(params, f, sort_keys=False)
    if git:
        run(["git", "init", "-q", "-b", "main"], root)
        run(["git", "config", "user.email", "tests@cfebm.invalid"], root)
        run(["git", "config", "user.name", "cfebm tests"], root)
        run([os.path.join(BIN, "dvc"), "init", "-q"], root)
        run([os.path.join(BIN, "dvc"), "config", "core.analytics", "false"], root)
    shutil.copy(os.path.join(REPO, ".dvcignore"), os.path.join(root, ".dvcignore"))
    return root


def env(**extra: str) -> dict:
    """The environment for subprocesses: the venv first on PATH, the copies' code only."""
    e = {
        **os.environ,
        "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        "DVC_NO_ANALYTICS": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "PYTHONUNBUFFERED": "1",
    }
    e.pop("PYTHONPATH", None)
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e.pop("RAY_ADDRESS", None)
    e.update(extra)
    return e


def run(cmd: list[str], cwd, timeout: float = 300, check: bool = True, **env_extra):
    done = subprocess.run(
        cmd, cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def start(cmd: list[str], cwd, log_path: str, **env_extra) -> subprocess.Popen:
    """A background process in its own session (so that it can be killed as a group)."""
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller's stop()
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env(**env_extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Kill a process started by :func:`start` and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, proc=None):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite store and served artifacts,
    in the slim configuration (one worker, no job execution)."""

    def __init__(self, root: str):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1",
            "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", f"{root}/artifacts",
        ]  # fmt: skip
        self.proc = start(
            cmd, root, os.path.join(root, "server.log"), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
        )
        wait_for(self._healthy, 120, "the MLflow server", interval=0.5, proc=self.proc)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        kill_group(self.proc, signal.SIGTERM)


def ray_tmpdir() -> str:
    """A short temp folder for Ray (its socket paths must stay under 108 characters)."""
    return tempfile.mkdtemp(prefix="rt", dir="/tmp")


def train_dry_run(root: str) -> dict:
    """``python -m pipelines.train --stage 0 --dry-run`` on ``root``'s params.yaml, through
    its main() in this process (the project's code): the stage accepts them; returns the
    resolved settings."""
    from pipelines import train

    out = io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stdout(out):
        train.main(["--params", "params.yaml", "--stage", "0", "--dry-run"])
    return yaml.safe_load(out.getvalue())


class HoldingProxy:
    """An HTTP proxy in front of an S3 endpoint that passes every request through, except
    that, once :meth:`hold` is armed, it stops the first PUT whose path matches (and, if
    :meth:`hold` names a process, that comes from it): the request never reaches the store,
    :attr:`caught` is set while it waits, and after :meth:`drop` its connection is closed.
    A test kills the uploading process (:meth:`holder`) while its checkpoint upload is in
    flight: killing another worker would let the held client retry, and the upload would
    arrive after all."""

    def __init__(self, upstream: str):
        import http.server
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.pattern: re.Pattern | None = None
        self.pid: int | None = None
        self.caught, self.dropped = threading.Event(), threading.Event()
        self.held: str | None = None
        self.held_from: tuple[str, int] | None = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def forward(self) -> None:
                body = _request_body(self)
                if self.command == "PUT" and proxy._catch(self.path, self.client_address):
                    proxy.dropped.wait(120)
                    self.close_connection = True
                    return
                _relay(self, proxy.upstream, body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self, pattern: str, pid: int | None = None) -> None:
        with self.lock:
            self.pattern, self.pid, self.held = re.compile(pattern), pid, None
            self.caught.clear()
            self.dropped.clear()

    def _catch(self, path: str, client: tuple[str, int]) -> bool:
        with self.lock:
            if self.pattern is None or not self.pattern.search(path):
                return False
            if self.pid is not None and self._pid_of(client) != self.pid:
                return False
            self.pattern, self.held, self.held_from = None, path, client
        self.caught.set()
        return True

    def holder(self) -> int:
        """PID of the process whose held request waits on this proxy."""
        pid = self._pid_of(self.held_from)
        if pid is None:
            raise LookupError(f"no process holds the connection from {self.held_from}")
        return pid

    def _pid_of(self, client: tuple[str, int]) -> int | None:
        """The process at the client end of a connection to this proxy (the local end of
        its connection is the client address that the proxy saw)."""
        import psutil

        port = self.server.server_address[1]
        for c in psutil.net_connections(kind="tcp"):
            if c.pid and c.laddr == client and c.raddr and c.raddr.port == port:
                return c.pid
        return None

    def drop(self) -> None:
        self.dropped.set()

    def stop(self) -> None:
        self.dropped.set()
        self.server.shutdown()
        self.server.server_close()


_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _request_body(handler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while size := int(handler.rfile.readline().split(b";")[0], 16):
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)
    n = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(n) if n else b""


def _relay(handler, upstream, body: bytes) -> None:
    import http.client

    conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
    try:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
        sends_body = body or handler.command in ("PUT", "POST")
        conn.request(handler.command, handler.path, body if sends_body else None, headers)
        resp = conn.getresponse()
        data = resp.read()
        handler.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP or (
                handler.command == "HEAD" and k.lower() == "content-length"
            ):
                handler.send_header(k, v)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
    finally:
        conn.close()
