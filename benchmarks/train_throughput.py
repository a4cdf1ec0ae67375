"""Benchmark: training throughput (images/s) of one stage, plain cfebm vs Ray Train.

    python -m benchmarks.train_throughput [--stage 1] [--steps 60] [--warmup 10]
                                          [--variants plain,ray1,ray2] [--json FILE]

The same work in every variant: stage ``--stage`` of the default model (params.yaml's
``train`` section), ``--warmup`` + ``--steps`` iterations at its global batch size on a
synthetic pyramid (written once, not timed; uint8 noise: the Langevin chain costs the same
whatever the images).

- ``plain``: :class:`cfebm.trainer.Trainer` in a fresh process, torch using every core;
- ``ray1``: the training stage's Ray Train worker (pipelines/train.py) on a local Ray,
  1 worker with every core;
- ``ray2``: the same, 2 DDP workers sharing the cores (each half the batch);
- ``gpu`` / ``ray1-gpu``: plain and 1 Ray worker on CUDA, when there is a GPU.

Per variant: ``steady`` images/s over the timed steps (after warm-up; Ray: measured inside
the worker) and ``end_to_end`` images/s over everything a user waits for (Ray: start-up
of the local Ray, the controller and the workers, checkpoints, shutdown). The overhead of
Ray is reported as ``plain / ray`` ratios of both. No checkpoint is written inside the
timed window (``loop.checkpoint_every`` is larger than the run). The machine may be shared:
the variants run interleaved ``--repeats`` times and the best run of each is kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from cfebm.config import build_dataclass, from_dict, to_dict
from cfebm.model import CoarseToFineEBM
from cfebm.trainer import Trainer, model_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("plain", "ray1", "ray2", "gpu", "ray1-gpu")


def default_params() -> dict:
    import yaml

    with open(os.path.join(REPO, "params.yaml")) as f:
        return yaml.safe_load(f)["train"]


def bench_options(stage: int, steps: int):
    """The default training stage's options, with stage ``stage`` lasting exactly ``steps``
    iterations (its fade phase kept in proportion, so beta < 1 steps are timed too)."""
    from pipelines.train import TrainStage

    opts = build_dataclass(TrainStage, {**default_params(), "stages": []}, "train")
    model = replace(opts.model, channels=opts.model.channels or 1)
    r = model.resolutions[stage]
    batch = opts.optim.batch_for(r)
    images = steps * batch
    fade = 0 if stage == 0 else images // 3
    optim = replace(opts.optim, fade_images=fade, stable_images=images - fade, images={r: images})
    loop = replace(opts.loop, checkpoint_every=10**9, progress_every_s=1e9, warmup_steps=0)
    opts = replace(opts, model=model, optim=optim, loop=loop)
    return opts, batch


def write_synthetic_pyramid(root: str, cfg, n: int = 1024) -> str:
    """A pyramid root of ``n`` synthetic images (source ``shapes``) at every stage resolution."""
    from cfebm.data import PrepareConfig, PyramidConfig, build_pyramid, prepare

    prepared, out = os.path.join(root, "prepared"), os.path.join(root, "pyramid")
    prepare(
        PrepareConfig(
            source="shapes",
            num_train=n,
            num_test=16,
            shard_size=256,  # 4 shards: each of 2 workers reads its own
            resolution=cfg.model.resolutions[-1],
            channels=cfg.model.channels,
            out=prepared,
        )
    )
    build_pyramid(PyramidConfig(input=prepared, out=out, coarsest=cfg.model.resolutions[0]))
    return out


def previous_model(cfg, stage: int) -> dict | None:
    """A stage ``stage - 1`` model file (untrained: the cost of training does not depend on
    the weights)."""
    if stage == 0:
        return None
    model = CoarseToFineEBM(cfg.model, stage=stage - 1)
    ckpt = {
        "format": "cfebm-checkpoint/2",
        "config": to_dict(cfg),
        "stage": stage - 1,
        "model": model.state_dict(),
        "optimizer": {},
        "best": None,
        "state": {
            "stage": stage - 1,
            "stage_images": 0,
            "step": 0,
            "total_images": 0,
            "rollbacks": 0,
            "flops": 0.0,
        },
    }
    return model_file(ckpt)


def run_plain(cfg, data_url: str, stage: int, warmup: int, device: str) -> dict:
    """The plain trainer in a fresh process (as each Ray worker is one)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_plain, (to_dict(cfg), data_url, stage, warmup, device))


def _plain(config: dict, data_url: str, stage: int, warmup: int, device: str) -> dict:
    from cfebm.data import PyramidStore

    cfg = from_dict(config)
    r = cfg.model.resolutions[stage]
    images = torch.from_numpy(np.array(PyramidStore(data_url).read("train", r)))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, {r: images}, device, model=CoarseToFineEBM(cfg.model, stage=stage))
    times = []
    while not trainer.stage_done:
        t = time.perf_counter()
        trainer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    batch = cfg.train.batch_for(r)
    timed = times[warmup:]
    return {
        "steady": batch * len(timed) / sum(timed),
        "end_to_end": batch * len(times) / total,
        "seconds": total,
    }


def run_ray(opts, data_url: str, stage: int, warmup: int, workers: int, gpu: bool) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines import ray_utils
    from pipelines.train import train_loop_per_worker

    cpus = os.cpu_count() or 1
    storage = tempfile.mkdtemp(prefix="cfebm-bench-ray-")
    t0 = time.perf_counter()
    ray_utils.connect(None, None)
    opts = replace(
        opts,
        loop=replace(opts.loop, warmup_steps=warmup),
        ray=replace(
            opts.ray, resources_per_worker={"CPU": float(max(1, cpus // workers))}, use_gpu=gpu
        ),
    )
    cfg = opts.config()
    job = {
        "options": opts,
        "stage": stage,
        "config": cfg,
        "data_url": data_url,
        "previous": previous_model(cfg, stage),
        "tracking_uri": None,
        "run_id": None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": max(1, cpus // workers)},
        ),
        run_config=ray.train.RunConfig(
            name="bench",
            storage_path=storage,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    summary = trainer.fit().return_value
    ray_utils.disconnect()
    total = time.perf_counter() - t0
    shutil.rmtree(storage, ignore_errors=True)
    return {
        "steady": summary["steady_images_per_s"],
        "end_to_end": summary["stage_images"] / total,
        "seconds": total,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput")
    p.add_argument("--stage", type=int, default=1, help="stage to time (default 1)")
    p.add_argument("--steps", type=int, default=60, help="timed iterations (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed first iterations")
    p.add_argument("--variants", default="plain,ray1,ray2,gpu,ray1-gpu")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, best kept (2)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    if not torch.cuda.is_available():
        skipped = [v for v in variants if "gpu" in v]
        if skipped:
            print(f"no CUDA device: skipping {', '.join(skipped)}")
        variants = [v for v in variants if "gpu" not in v]

    opts, batch = bench_options(args.stage, args.steps + args.warmup)
    cfg = opts.config()
    r = cfg.model.resolutions[args.stage]
    root = tempfile.mkdtemp(prefix="cfebm-bench-")
    rows = []
    try:
        data = write_synthetic_pyramid(root, cfg)
        print(
            f"stage {args.stage} ({r}x{r}), global batch {batch}, {args.warmup} + {args.steps} "
            f"iterations, {cfg.sampler.steps} Langevin steps per stage, {os.cpu_count()} CPUs"
        )
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # variants interleaved: a busy spell hits all alike
            for v in variants:
                if v in ("plain", "gpu"):
                    res = run_plain(
                        cfg, data, args.stage, args.warmup, "cuda" if v == "gpu" else "cpu"
                    )
                else:
                    workers = 2 if v == "ray2" else 1
                    res = run_ray(opts, data, args.stage, args.warmup, workers, "gpu" in v)
                print(
                    f"  {v:9s} steady {res['steady']:8.1f} img/s   end-to-end "
                    f"{res['end_to_end']:8.1f} img/s   ({res['seconds']:.1f} s)",
                    flush=True,
                )
                if v not in best or res["steady"] > best[v]["steady"]:
                    best[v] = res
        print(f"best of {args.repeats}:")
        for v in variants:
            res = best[v]
            rows.append({"variant": v, **res})
            print(
                f"  {v:9s} steady {res['steady']:8.1f} img/s   end-to-end "
                f"{res['end_to_end']:8.1f} img/s   ({res['seconds']:.1f} s)",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = {row["variant"]: row for row in rows}
    for plain, ray_variants in (("plain", ("ray1", "ray2")), ("gpu", ("ray1-gpu",))):
        for v in ray_variants:
            if plain in base and v in base:
                s = base[plain]["steady"] / base[v]["steady"]
                e = base[plain]["end_to_end"] / base[v]["end_to_end"]
                print(f"  {plain} / {v}: steady {s:.2f}x, end-to-end {e:.2f}x")
                rows.append({"variant": f"{plain}/{v}", "steady_ratio": s, "end_to_end_ratio": e})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
