"""Benchmark: what each preset of presets/ costs, stage by stage, on this machine.

    python -m benchmarks.presets [--presets cifar10,celeba64,cifar10-smoke] [--steps 2]
                                 [--device cpu]

For every stage of a preset (its network, sampler and batch sizes laid over params.yaml,
as ``make run PRESET=...`` lays them), a few training iterations on synthetic images of the
stage's resolution are timed after one warm-up iteration, in a fresh process per preset:
seconds per iteration (coarse-to-fine chain through every stage, loss, Adam step) and the
process's peak resident memory. The stage's iterations are its image budget (the trainer's
``stage_budget``) divided by its batch; ``hours`` is their product: an extrapolation from
the measured iterations, labelled as such, not a measured run (evaluation, data loading
and Ray start-up are not in it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import yaml

from benchmarks.langevin import cpu_info
from benchmarks.pyramid import peak_rss_kib
from cfebm.config import from_dict
from cfebm.model import CoarseToFineEBM
from cfebm.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("cifar10-smoke", "cifar10", "celeba64")


def preset_train_section(name: str) -> dict:
    """params.yaml's ``train`` section with presets/<name>.yaml laid over it."""
    from pipelines.run import merge  # the merge of `make run PRESET=...`

    with open(os.path.join(REPO, "params.yaml")) as f:
        params = yaml.safe_load(f)
    with open(os.path.join(REPO, "presets", f"{name}.yaml")) as f:
        params = merge(params, yaml.safe_load(f))
    return params["train"]


def measure(name: str, steps: int, device: str) -> list[dict]:
    """Rows (one per stage) of seconds per iteration for preset ``name``."""
    train = preset_train_section(name)
    cfg = from_dict({"model": train["model"], "sampler": train["sampler"], "train": train["optim"]})
    rows = []
    for stage, r in enumerate(cfg.model.resolutions):
        g = torch.Generator().manual_seed(stage)
        batch = cfg.train.batch_for(r)
        images = torch.randint(0, 256, (max(2 * batch, 256), cfg.model.channels, r, r), generator=g)
        torch.manual_seed(0)
        model = CoarseToFineEBM(cfg.model, stage=stage)
        trainer = Trainer(cfg, {r: images.to(torch.uint8)}, device, model=model)
        trainer.step()  # warm-up (allocations, oneDNN kernel choice)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        total = trainer.stage_budget
        iterations = -(-total // batch)
        rows.append(
            {
                "preset": name,
                "stage": stage,
                "resolution": r,
                "batch": batch,
                "steps": cfg.sampler.k(stage),
                "s_per_iteration": seconds,
                "images": total,
                "iterations": iterations,
                "hours": seconds * iterations / 3600,
                "peak_rss_mib": peak_rss_kib() / 1024,
            }
        )
    return rows


def table(rows: list[dict], device: str, steps: int) -> str:
    lines = [
        f"Preset costs on {device}: s/iteration measured over {steps} iteration(s) after a "
        "warm-up; hours = s/iteration x iterations (an extrapolation); peak RSS of the "
        "process after the stage",
        "",
        "| preset | stage | res | batch | s/iteration | images | iterations | hours "
        "(extrapolated) | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['stage']} | {r['resolution']} | {r['batch']} | "
            f"{r['s_per_iteration']:.3f} | {r['images']:,} | {r['iterations']:,} | "
            f"{r['hours']:,.2f} | {r['peak_rss_mib']:,.0f} |"
        )
    for name in dict.fromkeys(r["preset"] for r in rows):
        hours = sum(r["hours"] for r in rows if r["preset"] == name)
        lines.append(f"\n{name}: {hours:,.1f} h of training iterations in all (extrapolated)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.presets", description=__doc__)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--steps", type=int, default=2, help="timed iterations per stage (2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.device)))
        return 0
    model, flags = cpu_info()
    print(f"CPU: {model}; flags: {' '.join(flags) or 'none of avx512f/bf16/amx'}")
    rows = []
    for name in args.presets.split(","):
        cmd = [sys.executable, "-m", "benchmarks.presets", "--child", name]
        cmd += ["--steps", str(args.steps), "--device", args.device]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"benchmarks.presets: {name} failed")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    print(table(rows, args.device, args.steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
