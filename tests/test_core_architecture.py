"""The layout's rules, read from the source (AST), not from what happens to be imported:

- cfebm imports no Ray, MLflow or DVC anywhere, at module level or inside a function;
- the core that GPU machines run (model, sampling, training loop) needs torch, numpy and
  fsspec alone;
- every project module a DVC stage imports, directly or not, is one of its dvc.yaml deps
  (so that changing it re-runs the stage).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {"ray", "mlflow", "dvc"}
CORE = [
    "cfebm.model",
    "cfebm.frozen",
    "cfebm.sampling",
    "cfebm.loop",
    "cfebm.trainer",
    "cfebm.checkpoint",
    "cfebm.config",
]
CORE_ALLOWED = {"torch", "numpy", "fsspec"}


def module_path(name: str) -> str | None:
    base = os.path.join(ROOT, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(path):
            return path
    return None


def imports_of(path: str, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (relative imports resolved)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def project_closure(module: str) -> set[str]:
    """The project modules (cfebm, pipelines) that ``module`` imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        path = module_path(m)
        if m in seen or path is None:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        todo += [i for i in imports_of(path, m) if i.split(".")[0] in ("cfebm", "pipelines")]
    return seen


def all_modules(package: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out.append(rel.removesuffix(".__init__"))
    return out


@pytest.mark.parametrize("module", all_modules("cfebm"))
def test_cfebm_never_imports_ray_mlflow_or_dvc(module):
    bad = {i for i in imports_of(module_path(module), module) if i.split(".")[0] in FORBIDDEN}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_the_ast_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    import mlflow.entities\n    from ray import train\n")
    assert {"mlflow.entities", "ray", "ray.train"} <= imports_of(str(path), "cfebm.m")


def test_the_core_needs_torch_numpy_and_fsspec_alone():
    closure = set().union(*(project_closure(m) for m in CORE))
    external = set()
    for m in closure:
        external |= {i.split(".")[0] for i in imports_of(module_path(m), m)}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert external - stdlib - {"cfebm"} <= CORE_ALLOWED, sorted(external - stdlib - {"cfebm"})
    # and it really imports in a process with those alone (nothing else is touched)
    code = (
        "import sys\n"
        f"for m in {CORE!r}: __import__(m)\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & "
        "{'ray', 'mlflow', 'dvc', 'torchvision', 'torch_fidelity', 'PIL', 'jsonargparse'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stderr


def stage_commands() -> dict[str, tuple[list[str], list[str]]]:
    """dvc.yaml's stages: (modules their commands run, deps)."""
    with open(os.path.join(ROOT, "dvc.yaml")) as f:
        stages = yaml.safe_load(f)["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        modules = re.findall(r"python -m (pipelines\.\w+)", body["cmd"])
        out[name] = (modules, [d for d in body.get("deps", []) if "${" not in d or "/" in d])
    return out


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage):
    modules, deps = stage_commands()[stage]
    assert modules, f"stage {stage} runs no pipelines module"
    closure = set().union(*(project_closure(m) for m in modules))
    files = {os.path.relpath(module_path(m), ROOT) for m in closure}
    uncovered = sorted(
        f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
    )
    assert not uncovered, f"dvc.yaml stage {stage} imports but does not depend on {uncovered}"
