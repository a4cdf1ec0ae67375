"""The paper's central claim as an experiment: coarse to fine against training the finest
resolution directly and against progressive growing without coarse-to-fine sampling, each
stopped at the same compute (FLOPs counted by the trainer: every energy evaluation, input
gradient and parameter gradient; :mod:`cfebm.flops`).

- ``coarse_to_fine``: the stages as configured (e.g. 4 -> 8 -> 16, K Langevin steps per
  stage, each stage's chain through every finished stage's frozen energy);
- ``finest_direct``: the same network at the finest resolution only, trained there from the
  start, with chains of the same total length ((S + 1) K steps) from noise;
- ``no_coarse_sampling``: progressive growing as in coarse_to_fine, but each chain starts
  from noise at the current resolution and runs (s + 1) K steps of the current energy alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from .config import CFEBMConfig, ConfigError
from .data import PyramidStore, training_images
from .evaluate import ScoreHook, reference_images
from .loop import Hooks, LoopConfig, train_stage
from .metrics import Extractor, MetricsConfig
from .trainer import Trainer

VARIANTS = ("coarse_to_fine", "finest_direct", "no_coarse_sampling")
POINTS = 4
"""Scores of a variant under a budget, at equal fractions of it."""


def variant_config(base: CFEBMConfig, variant: str) -> CFEBMConfig:
    """The config of ``variant`` (see the module docs)."""
    if variant == "coarse_to_fine":
        return base
    if variant == "no_coarse_sampling":
        return replace(base, sampler=replace(base.sampler, coarse_to_fine=False))
    if variant != "finest_direct":
        raise ConfigError(f"ablation variant {variant!r} not in {VARIANTS}")
    finest = base.model.resolutions[-1]
    return replace(
        base,
        model=replace(base.model, resolutions=(finest,)),
        sampler=replace(
            base.sampler,
            steps=base.sampler.chain_steps(base.model.num_stages - 1),
            stage_steps=None,
        ),
        train=replace(base.train, images={finest: 10**12}),  # stopped by the compute budget
    )


class Curve(Hooks):
    """Scores at the compute ``marks`` (without marks: at the end of every stage)."""

    def __init__(self, name: str, marks: list[float], score, log):
        self.name, self.marks, self.score, self.log = name, list(marks), score, log
        self.points: list[dict] = []

    def after_step(self, t, r, seconds) -> None:
        while self.marks and t.state.flops >= self.marks[0]:
            self.marks.pop(0)
            self.add(t)

    def add(self, t) -> None:
        self.points.append({"gflops": t.state.flops / 1e9, **self.score(t)})
        self.log(f"ablation: {self.name}: {self.points[-1]}")

    def line(self, text: str) -> None:
        self.log(f"ablation: {self.name}: {text}")


def run_variant(name: str, cfg: CFEBMConfig, store, score, budget: float | None, log):
    """(trainer, curve, seconds): ``cfg`` trained through its stages until its schedule
    ends or it has spent ``budget`` FLOPs."""
    data = training_images(store, cfg.model.resolutions)
    marks = [budget * (i + 1) / POINTS for i in range(POINTS)] if budget else []
    trainer, curve = Trainer(cfg, data), Curve(name, marks, score, log)
    loop = LoopConfig(checkpoint_every=10**9, progress_every_s=30, max_flops=budget)
    t0 = time.monotonic()
    while True:
        summary = train_stage(trainer, loop, [curve])
        if summary.status == "diverged":
            raise RuntimeError(f"ablation: {name} diverged: {summary.error}")
        if budget is None:
            curve.add(trainer)
        if summary.status == "stopped" or trainer.state.stage == cfg.model.num_stages - 1:
            break
        trainer.advance_stage()
    if not curve.points or curve.points[-1]["gflops"] * 1e9 < trainer.state.flops:
        curve.add(trainer)
    return trainer, curve, time.monotonic() - t0


def run_ablation(
    base: CFEBMConfig,
    store: PyramidStore,
    extractor: Extractor,
    variants=VARIANTS,
    *,
    budget_gflops: float | None = None,
    num_samples: int = 500,
    num_reference: int | None = 2000,
    log: Callable[[str], None] = print,
    done: Callable[[str, CFEBMConfig, dict], None] | None = None,
) -> dict:
    """Train each variant to the same compute and score it (FID and KID of
    ``num_samples`` samples at its current resolution in ``extractor``'s space); the
    budget is coarse_to_fine's whole schedule unless ``budget_gflops`` is given. Returns
    {variant: {gflops, seconds, fid, kid, resolution, images, curve}}; ``done`` is called
    with each result as it is ready."""
    bad = sorted(set(variants) - set(VARIANTS))
    if bad or not variants:
        raise ConfigError(f"ablation.variants: {bad or 'none'} not in {VARIANTS}")
    budget = budget_gflops * 1e9 if budget_gflops else None
    if budget is None and "coarse_to_fine" not in variants:
        raise ConfigError("ablation: set budget_gflops, or include coarse_to_fine (it sets it)")
    resolutions = base.model.resolutions
    refs = {r: reference_images(store, "train", r, num_reference, 0) for r in resolutions}
    metrics = MetricsConfig(prc=False, kid_subset_size=min(1000, num_samples))

    def score(t) -> dict:
        hook = ScoreHook(extractor, refs[t.resolution], num_samples=num_samples, metrics=metrics)
        values = hook.evaluate(t)
        kid = hook.key.replace("fid", "kid_mean", 1)
        return {"resolution": t.resolution, "fid": values[hook.key], "kid": values[kid]}

    results = {}
    for name in sorted(variants, key=lambda v: v != "coarse_to_fine"):  # it sets the budget
        cfg = variant_config(base, name)
        log(f"ablation: {name}: training" + (f" to {budget / 1e9:.4g} GFLOPs" if budget else ""))
        trainer, curve, seconds = run_variant(name, cfg, store, score, budget, log)
        budget = budget or trainer.state.flops
        final = curve.points[-1]
        results[name] = {
            "gflops": trainer.state.flops / 1e9,
            "seconds": round(seconds, 1),
            "fid": final["fid"],
            "kid": final["kid"],
            "resolution": final["resolution"],
            "images": trainer.state.total_images,
            "curve": curve.points,
        }
        log(
            f"ablation: {name}: FID {final['fid']:.3g}, KID {final['kid']:.3g} at "
            f"{final['resolution']}x{final['resolution']} after "
            f"{trainer.state.flops / 1e9:.4g} GFLOPs, {seconds:.0f} s"
        )
        if done is not None:
            done(name, cfg, results[name])
    return results


def table(results: dict, label: str) -> list[str]:
    """The final scores, compute and wall time of each variant as a Markdown table
    (``label``: the extractor's name)."""
    lines = [f"| variant | GFLOPs | seconds | FID ({label}) | KID |"]
    for name, r in results.items():
        fid, kid = r["fid"], r["kid"]
        lines.append(f"| {name} | {r['gflops']:.4g} | {r['seconds']:.0f} | {fid:.3f} | {kid:.4f} |")
    return lines
