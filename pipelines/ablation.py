"""``make ablation``: is coarse to fine better at equal compute? (the paper's central claim)

    python -m pipelines.ablation [--params params.yaml] [--budget_gflops 5e4] [...]

Trains three variants on the default data, in this process, and stops each at the same
compute (FLOPs of every energy evaluation, input gradient and parameter gradient, counted
by torch's FLOP counter; cfebm.trainer):

- ``coarse_to_fine``: the training stages as ``train`` configures them (4 -> 8 -> 16,
  K steps per stage, each stage's chain through every stage's frozen energy);
- ``finest_direct``: the same network at the finest resolution only, trained from the
  start there, with chains of the same length ((S + 1) K steps) from noise;
- ``no_coarse_sampling``: progressive growing as in coarse_to_fine, but every chain starts
  from noise at the current resolution and runs (s + 1) K steps of E_s alone.

The budget is what ``coarse_to_fine`` spends on its whole schedule, unless set. Each
variant is scored at equal fractions of the budget by FID/KID of its samples in the
features stage's feature space (at its current resolution; the last point, at the finest
resolution, is the comparison), logged as one MLflow run with FID against GFLOPs, and
the table of final scores, compute and wall time is printed and written to ``out``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cfebm import io as cio
from cfebm.config import CFEBMConfig, ConfigError, build_dataclass
from cfebm.data import PyramidStore
from cfebm.evaluate import ScoreHook, reference_images
from cfebm.loop import Hooks, LoopConfig, train_stage
from cfebm.metrics import MetricsConfig, make_extractor
from cfebm.trainer import Trainer
from pipelines import _cli, tracking

VARIANTS = ("coarse_to_fine", "finest_direct", "no_coarse_sampling")
POINTS = 4
"""Scores of a variant with a budget, at equal fractions of it."""


@dataclass
class AblationOptions:
    """Coarse to fine against training the finest resolution directly and against
    progressive growing without coarse-to-fine sampling, at equal compute."""

    data: str = "data/pyramid"
    features: str = "models/features.pt"
    """The domain extractor (the features stage's output) that scores the samples."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    budget_gflops: float | None = None
    """Compute of each variant; null: what coarse_to_fine spends on its whole schedule."""
    num_samples: int = 500
    num_reference: int | None = 2000
    threads: int | None = None
    """torch CPU threads; null: all cores."""
    out: str = "metrics/ablation.json"
    mlflow: tracking.TrackingOptions = field(default_factory=tracking.TrackingOptions)

    def __post_init__(self) -> None:
        bad = sorted(set(self.variants) - set(VARIANTS))
        if bad or not self.variants:
            raise ConfigError(f"ablation.variants: {bad} not in {VARIANTS}")


def variant_config(base: CFEBMConfig, variant: str) -> CFEBMConfig:
    """The cfebm config of ``variant`` (see the module docs)."""
    if variant == "coarse_to_fine":
        return base
    if variant == "no_coarse_sampling":
        return replace(base, sampler=replace(base.sampler, coarse_to_fine=False))
    finest = base.model.resolutions[-1]
    k = base.sampler.steps * base.model.num_stages
    return replace(
        base,
        model=replace(base.model, resolutions=(finest,)),
        sampler=replace(base.sampler, steps=k),
        train=replace(base.train, images={finest: 10**12}),  # stopped by the compute budget
    )


class Curve(Hooks):
    """Scores at the compute ``marks`` (or, without marks, at the end of every stage), and
    the loop's progress lines."""

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
    """Train one variant through its stages until its schedule ends or ``budget`` FLOPs."""
    data = {r: torch.from_numpy(np.array(store.read("train", r))) for r in cfg.model.resolutions}
    marks = []
    if budget:
        marks = [budget * (i + 1) / POINTS for i in range(POINTS)]
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


def run(o: AblationOptions, train, log=print) -> dict:
    if o.threads:
        torch.set_num_threads(o.threads)
    store = PyramidStore(o.data)
    base = CFEBMConfig(train.model.with_channels(store.channels), train.sampler, train.optim)
    extractor = make_extractor("domain", features=o.features)
    refs = {
        r: reference_images(store, "train", r, o.num_reference, 0) for r in base.model.resolutions
    }
    metrics = MetricsConfig(prc=False, kid_subset_size=min(1000, o.num_samples))

    def score(t) -> dict:
        hook = ScoreHook(extractor, refs[t.resolution], num_samples=o.num_samples, metrics=metrics)
        values = hook.evaluate(t)
        return {
            "resolution": t.resolution,
            "fid": values[hook.key],
            "kid": values[hook.key.replace("fid", "kid_mean")],
        }

    budget = o.budget_gflops * 1e9 if o.budget_gflops else None
    order = sorted(o.variants, key=lambda v: v != "coarse_to_fine")  # it sets the budget
    results = {}
    for name in order:
        cfg = variant_config(base, name)
        if budget is None and name != "coarse_to_fine":
            raise ConfigError("ablation: set budget_gflops, or include coarse_to_fine (it sets it)")
        log(f"ablation: {name}: training" + (f" to {budget / 1e9:.4g} GFLOPs" if budget else ""))
        trainer, curve, seconds = run_variant(name, cfg, store, score, budget, log)
        budget = budget or trainer.state.flops  # coarse_to_fine's whole schedule
        final = curve.points[-1]
        results[name] = {
            "gflops": trainer.state.flops / 1e9,
            "seconds": round(seconds, 1),
            "fid": final["fid"],
            "kid": final["kid"],
            "resolution": final["resolution"],
            "curve": curve.points,
            "images": trainer.state.total_images,
        }
        log(
            f"ablation: {name}: FID {final['fid']:.3g}, KID {final['kid']:.3g} at "
            f"{final['resolution']}x{final['resolution']} "
            f"after {trainer.state.flops / 1e9:.4g} GFLOPs, {seconds:.0f} s"
        )
        if o.mlflow.enabled:
            t = tracking.Tracking(o.mlflow)
            t.start(
                f"ablation-{name}",
                f"ablation:{name}:{time.time_ns()}",
                {"ablation": _cli.public(o), "variant": name, "config": dataclasses.asdict(cfg)},
                {"cfebm.stage": "ablation", "cfebm.ablation.variant": name},
            )
            for point in curve.points:
                step = int(point["gflops"])
                tracking.log_metrics(
                    t.client, t.run_id, step, {"fid": point["fid"], "kid": point["kid"]}
                )
            tracking.log_metrics(
                t.client, t.run_id, 0, {"seconds": seconds, "gflops": results[name]["gflops"]}
            )
            t.end()
    cio.write_bytes(o.out, _cli.json_bytes(results))
    log(f"ablation: | variant | GFLOPs | seconds | FID ({extractor.label}) | KID |")
    for name, r in results.items():
        log(
            f"ablation: | {name} | {r['gflops']:.4g} | {r['seconds']:.0f} | {r['fid']:.3f} "
            f"| {r['kid']:.4f} |"
        )
    return results


def main(argv: list[str] | None = None) -> None:
    from pipelines.train import TrainStage

    try:
        o, extra = _cli.parse(AblationOptions, "ablation", argv, doc=__doc__)
        train = build_dataclass(TrainStage, _cli.load_section(extra.params, "train"), "train")
        if extra.dry_run:
            return _cli.print_settings(o)
        run(o, train)
    except _cli.USER_ERRORS as e:
        _cli.fail("ablation", e)


if __name__ == "__main__":
    main()
