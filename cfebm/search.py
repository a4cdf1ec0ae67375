"""Searching the Langevin sampler: what may vary, over which range, and which trial wins.

Ray-agnostic: ``pipelines.tune`` maps a :class:`SearchSpace` onto Ray Tune's domains and
its results onto :class:`TrialSummary`; the choice of the best and the tuned settings that
training reads are decided here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from . import io as cio
from .config import CFEBMConfig, ConfigError

TUNABLE = ("step_size", "noise_start", "steps")
"""The sampler settings a search may change (SamplerConfig fields)."""
OUTCOMES = ("completed", "stopped_early", "diverged", "error", "not_run")
DIVERGED_SCORE = 1.0e6
"""The score of a trial whose training diverged: worse than any real KID or FID."""


@dataclass
class Dimension:
    """One searched setting: a range [low, high] (log scale with ``log``) or ``values``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    """Draw uniformly in log(value): the natural scale of step sizes and noise levels."""
    values: list[float] | None = None
    """Explicit candidates instead of a range."""
    grid: bool = False
    """With ``values``: try every value in order (``num_samples`` repeats the grid)."""

    def check(self, where: str, integer: bool) -> None:
        points = self.values if self.values is not None else [self.low, self.high]
        if self.values is not None and (self.low is not None or self.high is not None):
            raise ConfigError(f"{where}: give either values or low/high, not both")
        if self.values is not None and not self.values:
            raise ConfigError(f"{where}.values is empty")
        if self.values is None and self.grid:
            raise ConfigError(f"{where}.grid needs values")
        if any(v is None for v in points):
            raise ConfigError(f"{where}: needs low and high (or values)")
        for v in points:
            if not math.isfinite(v) or v < 0 or (integer and (int(v) != v or v < 1)):
                kind = "a positive integer (Langevin steps)" if integer else "a finite number >= 0"
                raise ConfigError(f"{where}: {v!r} is not {kind}")
        if self.values is None and not self.low < self.high:
            raise ConfigError(f"{where}: low {self.low} must be below high {self.high}")
        if self.values is None and self.log and self.low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0, got {self.low}")

    def contains(self, value: float) -> bool:
        if self.values is not None:
            return any(math.isclose(value, v, rel_tol=1e-9) for v in self.values)
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.values is not None:
            return f"{'grid' if self.grid else 'choice'} {list(self.values)}"
        return f"{'log' if self.log else 'uniform'}[{self.low:g}, {self.high:g}]"


@dataclass
class SearchSpace:
    """What the trials vary (null: keep ``train.sampler``'s value)."""

    step_size: Dimension | None = field(default_factory=lambda: Dimension(0.1, 10.0, True))
    """Langevin step size eta."""
    noise_start: Dimension | None = field(default_factory=lambda: Dimension(0.003, 0.05, True))
    """Initial Langevin noise sigma (the schedule then decays to ``noise_end``)."""
    steps: Dimension | None = None
    """K, Langevin steps per stage of the chain (integers)."""

    def __post_init__(self) -> None:
        for name, dim in self.dimensions().items():
            dim.check(f"tune.space.{name}", integer=name == "steps")
        if not self.dimensions():
            raise ConfigError("tune.space searches nothing: set step_size, noise_start or steps")

    def dimensions(self) -> dict[str, Dimension]:
        return {n: getattr(self, n) for n in TUNABLE if getattr(self, n) is not None}


@dataclass
class Asha:
    """Early stopping (asynchronous successive halving, Li et al. 2018)."""

    enabled: bool = True
    """false: every trial trains to the end (FIFO)."""
    grace_steps: int = 20
    """No trial is stopped before this many training steps."""
    reduction_factor: float = 2.0
    """At each rung only the best 1/factor of the trials that reached it go on."""

    def __post_init__(self) -> None:
        if self.grace_steps < 1 or not self.reduction_factor > 1:
            raise ConfigError("tune.asha: grace_steps must be >= 1 and reduction_factor > 1")


@dataclass
class TrialSummary:
    trial_id: str | None
    setting: dict
    outcome: str
    step: int = 0
    score: float | None = None
    error: str | None = None
    score_key: str | None = None


def trial_summary(
    trial_id: str,
    config: dict,
    metrics: dict,
    error: str | None,
    train_steps: int,
    metric: str,
) -> TrialSummary:
    """One trial's outcome from its last report (``metrics``: step, score, diverged, the
    metric keys) and its error: completed (all ``train_steps``), stopped_early (by early
    stopping or the time budget, after a score), diverged, error, or not_run."""
    step, score = int(metrics.get("step") or 0), metrics.get("score")
    if error is not None:
        outcome = "error"
    elif metrics.get("diverged"):
        outcome = "diverged"
    elif score is None:
        outcome = "not_run"
    else:
        outcome = "completed" if step >= train_steps else "stopped_early"
    good = outcome in ("completed", "stopped_early") and math.isfinite(score)
    prefix = "kid_mean_" if metric == "kid" else "fid_"
    return TrialSummary(
        trial_id,
        {k: config[k] for k in sorted(config) if k in TUNABLE},
        outcome,
        step,
        score if good else None,
        error.splitlines()[0][:500] if error is not None else None,
        next((k for k in metrics if k.startswith(prefix)), None),
    )


def describe(setting: dict) -> str:
    """``step_size 1.5, noise_start 0.01``: a sampler setting in a console line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in setting.items())


def trial_lines(trials: list[TrialSummary], best: TrialSummary) -> list[str]:
    """A console line per trial, the best scores first (``*`` marks the chosen trial)."""
    lines = []
    for t in sorted(trials, key=lambda t: (t.score is None, t.score or 0.0)):
        score = f"{t.score:.4g}" if t.score is not None else "-"
        mark = "*" if t is best else " "
        lines.append(
            f"{mark} {t.trial_id}  {describe(t.setting)}  {t.outcome} at step {t.step}: {score}"
        )
    return lines


class TuneError(RuntimeError):
    """The search produced no usable setting."""


def pick_best(trials: list[TrialSummary]) -> TrialSummary:
    """The trial trained furthest, then with the lowest score (scores compare only at equal
    training: an early ASHA stop is not better for its early score)."""
    scored = [t for t in trials if t.score is not None]
    if not scored:
        counts = ", ".join(
            f"{n} {o}" for o in OUTCOMES if (n := sum(t.outcome == o for t in trials))
        )
        errors = [f"{t.trial_id}: {t.error}" for t in trials if t.error]
        raise TuneError(
            f"no trial produced a score ({counts})"
            + (f"; first error: {errors[0]}" if errors else "")
            + ". Narrow tune.space (smaller step sizes diverge less) or raise time_budget_s."
        )
    return min(scored, key=lambda t: (-t.step, t.score))


def search_result(
    trials: list[TrialSummary], best: TrialSummary, baseline: dict, metric: str
) -> tuple[dict, dict]:
    """(the search's result: the best setting, its score, the baseline setting and every
    trial's outcome; its DVC metrics: the best score and setting, counts per outcome)."""
    result = {
        "sampler": best.setting,
        "score": best.score,
        "metric": metric,
        "metric_key": best.score_key,
        "step": best.step,
        "trial_id": best.trial_id,
        "baseline": baseline,
        "trials": [dataclasses.asdict(t) for t in trials],
    }
    metrics = {
        "best_score": best.score,
        **{f"best_{k}": v for k, v in best.setting.items()},
        "trials": len(trials),
        **{o: sum(t.outcome == o for t in trials) for o in OUTCOMES},
    }
    return result, metrics


def tuned_sampler(path: str) -> dict:
    """The sampler settings of the tune stage's output ``path`` (ConfigError naming it)."""
    if not cio.exists(path):
        raise ConfigError(
            f"train.sampler_from_tune: {path} does not exist; run the tune stage first "
            "(dvc repro tune), or set it to null"
        )
    try:
        sampler = json.loads(cio.read_bytes(path))["sampler"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"train.sampler_from_tune: {path} is not a tune result ({e})") from e
    bad = {k: v for k, v in sampler.items() if k not in TUNABLE or not isinstance(v, (int, float))}
    if bad or not isinstance(sampler, dict):
        raise ConfigError(f"train.sampler_from_tune: {path} has invalid sampler settings {bad}")
    return {k: int(v) if k == "steps" else float(v) for k, v in sampler.items()}


def with_sampler(cfg: CFEBMConfig, setting: dict) -> CFEBMConfig:
    values = {k: int(v) if k == "steps" else float(v) for k, v in setting.items()}
    return dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, **values))
