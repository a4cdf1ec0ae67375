"""Draw samples from a trained cfebm model.

    python -m pipelines.sample --model models/stage2/model.pt --num 64 --out samples.png

Writes N samples of the model's finest stage (or ``--stage``) as uint8 NCHW ``.npy``, or as
a PNG grid when the output name ends in ``.png``. The model may be a path, any fsspec URL,
or an MLflow ``runs:/`` / ``models:/`` URI; the output any path or fsspec URL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfebm.config import ConfigError
from cfebm.device import resolve
from cfebm.images import write_images
from cfebm.sampling import draw
from cfebm.trainer import sampler_of
from pipelines import _cli, models


@dataclass
class SampleOptions:
    """Draw samples from a trained model."""

    model: str = "models/stage2/model.pt"
    """The model (path, URL, ``runs:/`` or ``models:/`` URI)."""
    out: str = "samples.png"
    """Output: ``.npy`` (uint8 NCHW) or ``.png`` (a grid)."""
    num: int = 64
    """Number of samples."""
    stage: int | None = None
    """Stage to sample (its chain runs every stage up to it); null: the finest."""
    batch: int = 256
    """Chains run at once."""
    seed: int = 0
    steps: int | None = None
    """Langevin steps per stage; null: the model's."""
    step_size: float | None = None
    """Langevin step size; null: the model's."""
    device: str = "auto"
    precision: str = "auto"
    """The energies' arithmetic: fp32, bf16, or auto (bf16 where the device has bf16 units)."""
    scale: int = 4
    """PNG enlargement factor."""

    def __post_init__(self) -> None:
        if self.num < 1 or self.batch < 1 or self.scale < 1:
            raise ConfigError("--num, --batch and --scale must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")


def run(o: SampleOptions, extra=None) -> np.ndarray:
    """Draw the samples and write them; return them."""
    model, ckpt = models.load_model(o.model, resolve(o.device), o.stage)
    overrides = {k: v for k, v in (("steps", o.steps), ("step_size", o.step_size)) if v is not None}
    sampler, _ = sampler_of(ckpt, precision=o.precision, **overrides)
    images = draw(model, sampler, o.num, batch=o.batch, seed=o.seed, stage=o.stage)
    write_images(o.out, images, o.scale)
    return images


main = _cli.stage_main(
    SampleOptions,
    "sample",
    run,
    __doc__,
    lambda o, images: f"wrote {len(images)} samples {images.shape[1:]} to {o.out}",
)


if __name__ == "__main__":
    _cli.script(main)
