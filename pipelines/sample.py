"""Draw samples from a trained cfebm model.

    python -m pipelines.sample --model runs/stage2/model.pt --num 64 --out samples.png

Writes N samples of the model's finest stage (or ``--stage``) as uint8 NCHW ``.npy``, or
as a PNG grid when the output name ends in ``.png``. Model and output may be any fsspec
URL (local path, s3://...).
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np
import torch

from cfebm import io as cio
from cfebm.checkpoint import load_checkpoint
from cfebm.config import ConfigError, SamplerConfig, from_dict
from cfebm.images import grid_png
from cfebm.sampling import sample, to_uint8
from cfebm.trainer import model_from_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.sample", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="checkpoint path or URL (a stage's model.pt)")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output .npy (uint8 NCHW) or .png (grid)")
    p.add_argument("--stage", type=int, default=None, help="stage to sample (default: finest)")
    p.add_argument("--batch", type=int, default=256, help="chains run at once (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="Langevin steps per stage override")
    p.add_argument("--step-size", type=float, default=None, help="Langevin step size override")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the energy in bfloat16")
    p.add_argument("--scale", type=int, default=4, help="PNG enlargement factor (default 4)")
    args = p.parse_args(argv)
    if args.num < 1 or args.batch < 1:
        p.error("--num and --batch must be >= 1")
    return args


def draw(
    model, sampler: SamplerConfig, num: int, batch: int, stage: int | None, seed: int, dtype
) -> np.ndarray:
    """``num`` uint8 samples [N, C, r, r], in batches; deterministic given ``seed``."""
    gen = torch.Generator(device=model.head.linear.weight.device).manual_seed(seed)
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        x = sample(model, n, sampler, stage=stage, generator=gen, dtype=dtype)
        out.append(to_uint8(x).cpu().numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ckpt = load_checkpoint(args.model, map_location=args.device)
        cfg = from_dict(ckpt["config"])
        model = model_from_checkpoint(ckpt, args.device)
        if args.stage is not None and not 0 <= args.stage <= model.stage:
            raise ConfigError(f"--stage {args.stage}: the model has stages 0..{model.stage}")
        overrides = {"steps": args.steps, "step_size": args.step_size}
        sampler = from_dict(
            {"sampler": {**vars(cfg.sampler), **{k: v for k, v in overrides.items() if v}}}
        ).sampler
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    images = draw(model, sampler, args.num, args.batch, args.stage, args.seed, dtype)
    if args.out.endswith(".png"):
        cio.write_bytes(args.out, grid_png(images, scale=args.scale))
    else:
        buf = io.BytesIO()
        np.save(buf, images)
        cio.write_bytes(args.out, buf.getvalue())
    print(f"wrote {len(images)} samples {images.shape[1:]} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
