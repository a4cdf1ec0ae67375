"""The library stays pure PyTorch: importing all of cfebm pulls in no Ray, MLflow or DVC."""

import pkgutil
import subprocess
import sys

import cfebm


def test_cfebm_imports_no_ray_mlflow_or_dvc():
    modules = [m.name for m in pkgutil.walk_packages(cfebm.__path__, "cfebm.")]
    assert "cfebm.trainer" in modules and "cfebm.frozen" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in {'ray', 'mlflow', 'dvc'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
