"""`python -m pipelines.sample` as a user runs it, on a real checkpoint: once in a process of
its own, otherwise through the same main() in this process."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cfebm.checkpoint import save_checkpoint
from cfebm.config import CFEBMConfig, ModelConfig, SamplerConfig, TrainConfig
from cfebm.loop import fit
from cfebm.trainer import Trainer
from pipelines import sample


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = CFEBMConfig(
        model=ModelConfig(channels=3, resolutions=(4, 8), base_width=4),
        sampler=SamplerConfig(steps=2),
        train=TrainConfig(batch_size={4: 4}, fade_images=4, stable_images=4),
    )
    x8 = torch.rand(8, 3, 8, 8) * 255
    trainer = Trainer(cfg, {8: x8, 4: torch.nn.functional.avg_pool2d(x8, 2)})
    fit(trainer)
    url = str(tmp_path_factory.mktemp("model") / "model.pt")
    save_checkpoint(trainer.model_state(), url)
    return url


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.sample", *args], capture_output=True, text=True
    )


COUNT = ("--num", "5", "--batch", "2")
SEEDED = (*COUNT, "--seed", "5")


@pytest.fixture(scope="module")
def from_the_command_line(checkpoint, tmp_path_factory):
    """Samples written by ``python -m pipelines.sample`` in a process of its own (the rest
    of this module calls the same main() in this process: a subprocess only adds the
    start-up time of torch)."""
    out = tmp_path_factory.mktemp("cli") / "s.npy"
    r = run("--model", checkpoint, *SEEDED, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote 5 samples (3, 8, 8) to {out}" in r.stdout
    return np.load(out)


def test_writes_uint8_nchw_npy_of_finest_and_coarser_stage(
    checkpoint, from_the_command_line, tmp_path
):
    a = from_the_command_line
    assert a.shape == (5, 3, 8, 8) and a.dtype == np.uint8
    out = tmp_path / "s.npy"
    sample.main(["--model", checkpoint, "--num", "3", "--stage", "0", "--out", str(out)])
    assert np.load(out).shape == (3, 3, 4, 4)


def test_same_seed_same_samples(checkpoint, from_the_command_line, tmp_path):
    out = tmp_path / "again.npy"
    sample.main(["--model", checkpoint, *SEEDED, "--out", str(out)])  # here, not a subprocess
    assert np.array_equal(np.load(out), from_the_command_line)
    sample.main(["--model", checkpoint, *COUNT, "--seed", "6", "--out", str(out)])
    assert not np.array_equal(np.load(out), from_the_command_line)


def test_png_grid(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(["--model", checkpoint, "--num", "4", "--out", str(out), "--scale", "2"])
    img = Image.open(out)
    assert img.size == (2 * 16 + 3, 2 * 16 + 3)  # 2x2 grid of 8px images x2, 1px borders


def test_bad_inputs_are_clear_errors(checkpoint, tmp_path):
    out = ("--out", str(tmp_path / "x.npy"))
    cases = [
        (("--model", str(tmp_path / "nope.pt")), "nope.pt"),
        (("--model", str(tmp_path)), "is a folder, not a checkpoint file"),
        (("--model", checkpoint, "--stage", "5"), "stage 5"),
        (("--model", checkpoint, "--num", "0"), "--num"),
        (("--model", checkpoint, "--steps", "0"), "--steps must be >= 1"),
        (("--model", checkpoint, "--steps", "-3"), "--steps must be >= 1"),
    ]
    # One as a user meets it (exit status, one line, no traceback); the rest in this process
    # through the same main(), whose only way out on bad input is SystemExit with the line.
    r = run(*cases[0][0], *out)
    assert r.returncode != 0 and cases[0][1] in r.stderr and "Traceback" not in r.stderr
    for args, message in cases[1:]:
        with pytest.raises(SystemExit) as e:
            sample.main([*args, *out])
        assert isinstance(e.value.code, str) and message in e.value.code, (args, e.value.code)
        assert e.value.code.startswith("sample: error: ")
    assert not (tmp_path / "x.npy").exists()
