"""Benchmark: training throughput (images/s) of one stage, plain cfebm vs Ray Train.

    python -m benchmarks.train_throughput [--stage 1] [--steps 60] [--warmup 10]
                                          [--variants plain,ray1,ray2] [--json FILE]

The same work in every variant: stage ``--stage`` of the default model (params.yaml's
``train`` section), ``--warmup`` + ``--steps`` iterations at its global batch size on a
synthetic pyramid (written once, not timed; uint8 noise: the Langevin chain costs the same
whatever the images).

- ``plain``: :class:`cfebm.trainer.Trainer` in a fresh process, torch using every core;
- ``ray1``: the training stage's Ray Train loop (pipelines/train_loop.py) on a local Ray,
  1 worker with every core;
- ``ray2``: the same, 2 DDP workers sharing the cores (each half the batch);
- ``gpu`` / ``ray1-gpu``: plain and 1 Ray worker on CUDA, when there is a GPU.

Per variant: ``steady`` images/s over the timed steps (after warm-up; Ray: measured inside
the worker) and ``end_to_end`` images/s over everything a user waits for (Ray: start-up
of the local Ray, the controller and the workers, checkpoints, shutdown). The overhead of
Ray is reported as ``plain / ray`` ratios of both. No checkpoint is written inside the
timed window (``checkpoint.every`` is larger than the run). The machine may be shared:
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
from dataclasses import asdict

import numpy as np
import torch

from cfebm.config import from_dict, to_dict
from cfebm.model import EnergyNet
from cfebm.trainer import Trainer
from pipelines.train_params import params_from_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("plain", "ray1", "ray2", "gpu", "ray1-gpu")


def default_params() -> dict:
    import yaml

    with open(os.path.join(REPO, "params.yaml")) as f:
        return yaml.safe_load(f)["train"]


def bench_config(stage: int, steps: int):
    """The default cfebm config, with stage ``stage`` lasting exactly ``steps`` iterations
    (its fade phase kept in proportion, so beta < 1 steps are timed too)."""
    params = params_from_dict(default_params())
    d = to_dict(params.cfebm)
    r = params.cfebm.model.resolutions[stage]
    batch = params.cfebm.train.batch_for(r)
    images = steps * batch
    if stage == 0:
        d["train"].update(stable_images=images)
    else:
        d["train"].update(fade_images=images // 3, stable_images=images - images // 3)
    return from_dict(d), batch


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


def previous_model(cfg, stage: int) -> bytes | None:
    from pipelines.train_loop import checkpoint_bytes

    if stage == 0:
        return None
    model = EnergyNet(cfg.model, stage=stage - 1)
    return checkpoint_bytes(
        {
            "format": "cfebm-checkpoint/1",
            "config": to_dict(cfg),
            "stage": stage - 1,
            "model": model.state_dict(),
        }  # fmt: skip
    )


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
    trainer = Trainer(cfg, {r: images}, device, model=EnergyNet(cfg.model, stage=stage))
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


def run_ray(cfg, data_url: str, stage: int, warmup: int, workers: int, gpu: bool) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines import ray_utils
    from pipelines.train_loop import StageJob, train_loop_per_worker

    cpus = os.cpu_count() or 1
    storage = tempfile.mkdtemp(prefix="cfebm-bench-ray-")
    t0 = time.perf_counter()
    ray_utils.connect(None, None)
    job = StageJob(
        stage=stage,
        config=to_dict(cfg),
        data_url=data_url,
        warm_start=previous_model(cfg, stage),
        checkpoint_every=10**9,
        progress_every_s=1e9,
        threads=max(1, cpus // workers),
        use_gpu=gpu,
        warmup_steps=warmup,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
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

    cfg, batch = bench_config(args.stage, args.steps + args.warmup)
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
                    res = run_ray(cfg, data, args.stage, args.warmup, workers, "gpu" in v)
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
