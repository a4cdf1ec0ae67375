"""The training loop: one stage of a :class:`cfebm.trainer.Trainer` to its end.

:func:`train_stage` is the only training loop in cfebm. It steps the trainer, evaluates
and checkpoints at a fixed cadence, rolls a diverged step back to the last good state
(with a lower learning rate and new Langevin noise), refuses to checkpoint non-finite
weights, keeps the best evaluated network when asked, and reports everything through
:class:`Hooks`. What differs between a Ray Train worker, a Ray Tune trial, the
translator and a plain script is only the hooks they pass: where checkpoints go, where
metrics go, what an evaluation measures.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .trainer import DivergenceError, StepResult, Trainer, params_finite


@dataclass
class LoopConfig:
    """How a stage is trained besides the optimisation itself."""

    checkpoint_every: int = 100
    """Steps between checkpoints: a crash loses at most this many, a rollback goes back to
    the last one."""
    max_rollbacks: int = 3
    """Divergences of a stage survived by rolling back, then the stage stops (diverged)."""
    lr_factor: float = 0.5
    """Learning rate multiplied by this after each rollback (1: keep it)."""
    reseed: bool = True
    """New Langevin noise after a rollback, so that the same chains are not replayed."""
    evaluate_every: int = 0
    """Steps between evaluations (and one at the end of the stage); 0: none."""
    keep_best: bool = False
    """The stage's result is its best-scoring evaluated network (lowest ``score``)."""
    progress_every_s: float = 15.0
    """Seconds between progress lines."""
    warmup_steps: int = 0
    """Steps left out of the steady images/s (benchmarks)."""
    max_flops: float | None = None
    """Stop the stage once the run has spent this many FLOPs (equal-compute comparisons)."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.max_rollbacks < 0 or self.evaluate_every < 0:
            raise ValueError("checkpoint_every must be >= 1, max_rollbacks and evaluate_every >= 0")
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {self.lr_factor}")
        if self.keep_best and not self.evaluate_every:
            raise ValueError("keep_best needs evaluations (evaluate_every > 0)")


class Hooks:
    """What the loop reports and persists through. Every method is optional; the loop calls
    each on every data-parallel rank, the same number of times."""

    def before_step(self, trainer: Trainer) -> torch.Tensor | None:
        """A batch to train the next step on instead of the trainer's next one."""
        return None

    def after_step(self, trainer: Trainer, result: StepResult, seconds: float) -> None:
        """After every applied step (per-step metrics)."""

    def evaluate(self, trainer: Trainer) -> dict[str, float] | None:
        """Measure the current model; a ``score`` entry (lower is better) ranks it."""
        return None

    def checkpoint(self, trainer: Trainer, info: dict) -> None:
        """Persist ``trainer.state_dict()``; ``info`` has the step's metrics and ``name``."""

    def event(self, name: str, info: dict) -> None:
        """``resumed``, ``rollback``, ``evaluated``, ``best``, ``diverged``."""

    def line(self, text: str) -> None:
        """A progress line for people."""


class MetricsLog(Hooks):
    """The loop's numbers, sent to :meth:`log` (an MLflow run, say): every step's curves
    (:func:`step_metrics` over ``world`` data-parallel workers), where a resume started, each
    rollback with its new lr, and every evaluation."""

    world = 1

    def log(self, step: int, values: dict) -> None:
        """Where the numbers go (nowhere here)."""

    def after_step(self, trainer: Trainer, result: StepResult, seconds: float) -> None:
        self.log(trainer.state.step, step_metrics(trainer, result, seconds, self.world))

    def event(self, name: str, info: dict) -> None:
        if name == "resumed":
            self.log(info["step"], {"resumed_from_step": info["step"]})
        elif name == "rollback":
            self.log(info["step"], {"rollbacks": info["rollbacks"], "lr": info["lr"]})
        elif name == "evaluated":
            self.log(info["step"], {k: v for k, v in info.items() if k != "step"})


class InjectDivergence(Hooks):
    """Fault injection: NaN images at step ``at_step`` of a stage, ``times`` times (each
    rollback replays that step), so that the divergence and rollback path can be exercised
    on a real run (``train.debug.inject_divergence_at_step``)."""

    def __init__(self, at_step: int, times: int = 1):
        self.at_step, self.times, self.fired = at_step, times, 0

    def before_step(self, trainer: Trainer) -> torch.Tensor | None:
        if trainer.state.step != self.at_step or self.fired >= self.times:
            return None
        self.fired += 1
        return trainer.next_batch().float() * float("nan")


class SlowCheckpoints(Hooks):
    """Pacing for fault tests: each checkpoint waits ``seconds`` after it is written, so
    that a kill can land between checkpoints however fast the steps are."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def checkpoint(self, trainer: Trainer, info: dict) -> None:
        time.sleep(self.seconds)


@dataclass
class FaultInjection:
    """Fault-test settings (:class:`InjectDivergence`, :class:`SlowCheckpoints`); leave them
    null and 0 in real runs."""

    inject_divergence_at_step: int | None = None
    """Feed NaN images at this step of the stage, so that it diverges and rolls back."""
    inject_divergence_times: int = 1
    checkpoint_delay_s: float = 0.0
    """Seconds each checkpoint waits once written (lets a test kill a stage mid-way)."""

    def hooks(self) -> list[Hooks]:
        """The hooks these settings ask for, to run after the stage's own."""
        out: list[Hooks] = []
        if self.inject_divergence_at_step is not None:
            out.append(
                InjectDivergence(self.inject_divergence_at_step, self.inject_divergence_times)
            )
        if self.checkpoint_delay_s > 0:
            out.append(SlowCheckpoints(self.checkpoint_delay_s))
        return out


@dataclass
class StageSummary:
    """How a call of :func:`train_stage` ended."""

    status: str
    """completed | already_complete | stopped (max_steps or max_flops) | diverged"""
    error: str | None
    stage: int
    step: int
    stage_images: int
    total_images: int
    beta: float
    lr: float
    rollbacks: int
    resumed_from_step: int | None
    steps_this_attempt: int
    seconds: float
    images_per_s: float | None
    steady_images_per_s: float | None
    flops: float
    best_score: float | None
    last: dict | None
    timings: dict[str, float]
    """Seconds of this attempt spent in the Langevin chains (``sampling``), in the rest of
    the steps (``loss``: energies, gradients, optimiser), in ``evaluate`` and in
    ``checkpoint`` (the hooks' work included)."""


class _Dispatch(Hooks):
    def __init__(self, hooks: Sequence[Hooks]):
        self.hooks = list(hooks)

    def before_step(self, trainer):
        for h in self.hooks:
            batch = h.before_step(trainer)
            if batch is not None:
                return batch
        return None

    def after_step(self, trainer, result, seconds):
        for h in self.hooks:
            h.after_step(trainer, result, seconds)

    def evaluate(self, trainer):
        out: dict = {}
        for h in self.hooks:
            out.update(h.evaluate(trainer) or {})
        return out or None

    def checkpoint(self, trainer, info):
        for h in self.hooks:
            h.checkpoint(trainer, info)

    def event(self, name, info):
        for h in self.hooks:
            h.event(name, info)

    def line(self, text):
        for h in self.hooks:
            h.line(text)


def _snapshot(trainer: Trainer) -> bytes:
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    return buf.getvalue()


def _restore(trainer: Trainer, snapshot: bytes) -> None:
    state = torch.load(io.BytesIO(snapshot), map_location=trainer.device, weights_only=True)
    trainer.load_state_dict(state)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _StageRun:
    def __init__(self, trainer: Trainer, cfg: LoopConfig, hooks: _Dispatch, resumed: bool):
        self.t, self.cfg, self.hooks = trainer, cfg, hooks
        self.resumed_from = trainer.state.step if resumed else None
        self.good = _snapshot(trainer)
        self.start_step, self.start_images = trainer.state.step, trainer.state.stage_images
        self.last_checkpoint = trainer.state.step if resumed else None
        self.last_evaluation: int | None = None
        self.last: StepResult | None = None
        self.error: str | None = None
        self.t0 = self.last_line = time.monotonic()
        self.timings = dict.fromkeys(("sampling", "loss", "evaluate", "checkpoint"), 0.0)
        self.steady_from = (self.t0, trainer.state.stage_images) if cfg.warmup_steps == 0 else None
        self.steady_until = self.steady_from

    def run(self, max_steps: int | None) -> StageSummary:
        t, cfg = self.t, self.cfg
        if self.resumed_from is not None:
            self.hooks.event("resumed", {"step": t.state.step, "rollbacks": t.state.rollbacks})
            self.hooks.line(
                f"[stage {t.state.stage}] resumed from the checkpoint at step {t.state.step} "
                f"({t.state.stage_images} images, beta {t.beta:.3f}, "
                f"{t.state.rollbacks} rollbacks)"
            )
        steps = 0
        while not t.stage_done:
            if max_steps is not None and steps >= max_steps:
                break
            if cfg.max_flops is not None and t.state.flops >= cfg.max_flops:
                break
            batch = self.hooks.before_step(t)
            t_step = time.monotonic()
            result = t.step(batch)
            seconds = time.monotonic() - t_step
            if result.diverged is not None:
                if not self.rollback(result.diverged):
                    return self.summary("diverged")
                continue
            steps += 1
            self.last = result
            self.timings["sampling"] += result.sample_seconds
            self.timings["loss"] += seconds - result.sample_seconds
            if t.state.step - self.start_step == cfg.warmup_steps:
                self.steady_from = (time.monotonic(), t.state.stage_images)
            row = {"stage": t.state.stage, "step": t.state.step}
            t.history["steps"].append({**row, **step_metrics(t, result, seconds, t.world_size)})
            self.hooks.after_step(t, result, seconds)
            self.steady_until = (time.monotonic(), t.state.stage_images)
            self.progress()
            if t.stage_done:
                break
            if cfg.evaluate_every and t.state.step % cfg.evaluate_every == 0:
                self.evaluate()
            due = t.state.step % cfg.checkpoint_every == 0
            if due and not self.checkpoint() and not self.rollback("non-finite weights"):
                return self.summary("diverged")
        return self.finish(steps)

    def finish(self, steps: int) -> StageSummary:
        t = self.t
        if self.cfg.evaluate_every and self.last_evaluation != t.state.step:
            self.evaluate()
        if self.last_checkpoint != t.state.step and not self.checkpoint():
            # Non-finite final weights: never written; a new attempt resumes the last good one.
            self.error = f"stage {t.state.stage}: the final weights are not finite"
            return self.summary("diverged")
        self.progress(force=True)
        if t.stage_done:
            return self.summary("completed" if steps else "already_complete")
        return self.summary("stopped")

    def evaluate(self) -> None:
        t = self.t
        self.last_evaluation = t.state.step
        start = time.monotonic()
        values = self.hooks.evaluate(t)
        self.timings["evaluate"] += time.monotonic() - start
        if not values:
            return
        self.hooks.event("evaluated", {"step": t.state.step, **values})
        row = {"stage": t.state.stage, "step": t.state.step, "stage_images": t.state.stage_images}
        t.history["evaluations"].append({**row, **values})
        score = values.get("score")
        keep = self.cfg.keep_best and score is not None and math.isfinite(score)
        if keep and t.remember_best(score):
            self.hooks.event("best", {"step": t.state.step, "score": score})

    def checkpoint(self) -> bool:
        """Persist the current state; False (nothing written) if its weights are not
        finite. The decision is the same on every rank."""
        t = self.t
        if not params_finite(t.model.current):
            return False
        r = self.last
        info = {
            "name": f"checkpoint-step{t.state.step:07d}",
            "stage": t.state.stage,
            "step": t.state.step,
            "stage_images": t.state.stage_images,
            "beta": t.beta,
            "rollbacks": t.state.rollbacks,
            **({"loss": r.loss, "energy_data": r.e_data, "energy_sample": r.e_sample} if r else {}),
        }
        start = time.monotonic()
        self.hooks.checkpoint(t, info)
        self.good = _snapshot(t)
        self.timings["checkpoint"] += time.monotonic() - start
        self.last_checkpoint = t.state.step
        return True

    def rollback(self, reason: str) -> bool:
        """Restore the last good state with a lower lr and new noise; False when the budget
        of rollbacks is spent (``self.error`` says why)."""
        t, cfg = self.t, self.cfg
        at, n = t.state.step, t.state.rollbacks + 1
        if n > cfg.max_rollbacks:
            self.error = (
                f"stage {t.state.stage} diverged at step {at} ({reason}) after "
                f"{n - 1} rollback(s), the limit. Lower the learning rate, the Langevin step "
                "size or raise the energy penalty, then re-run."
            )
            self.hooks.event("diverged", {"step": at, "reason": reason})
            self.hooks.line(f"error: {self.error}")
            return False
        lr = t.lr * cfg.lr_factor
        _restore(t, self.good)
        t.state.rollbacks = n
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        t.change_course(reseed=cfg.reseed)
        self.hooks.event("rollback", {"step": at, "rollbacks": n, "lr": lr, "reason": reason})
        self.hooks.line(
            f"[stage {t.state.stage}] diverged at step {at}: {reason}; rolled back to step "
            f"{t.state.step} (rollback {n}/{cfg.max_rollbacks}), lr -> {lr:.3g}"
            + (", new Langevin noise" if cfg.reseed else "")
        )
        return True

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_line < self.cfg.progress_every_s:
            return
        self.last_line = now
        t, r = self.t, self.last
        total, res = t.stage_budget, t.resolution
        line = (
            f"[stage {t.state.stage} {res}x{res}] step {t.state.step} | beta {t.beta:.3f} | "
            f"images {t.state.stage_images}/{total} ({100 * t.state.stage_images / total:.0f}%)"
        )
        if r is not None:
            elapsed = now - self.t0
            rate = (t.state.stage_images - self.start_images) / elapsed if elapsed > 0 else 0.0
            left = max(0, total - t.state.stage_images)
            line += (
                f" | loss {r.loss:+.4f} | E data {r.e_data:+.3f} sample {r.e_sample:+.3f}"
                f" | {rate:.0f} img/s | ETA {format_seconds(left / rate if rate else math.inf)}"
            )
        self.hooks.line(line)

    def summary(self, status: str) -> StageSummary:
        t = self.t
        seconds = time.monotonic() - self.t0
        images = t.state.stage_images - self.start_images
        steady = None
        if self.steady_from and self.steady_until:
            dt = self.steady_until[0] - self.steady_from[0]
            di = self.steady_until[1] - self.steady_from[1]
            steady = di / dt if dt > 0 and di > 0 else None
        return StageSummary(
            status=status,
            error=self.error,
            stage=t.state.stage,
            step=t.state.step,
            stage_images=t.state.stage_images,
            total_images=t.state.total_images,
            beta=t.beta,
            lr=t.lr,
            rollbacks=t.state.rollbacks,
            resumed_from_step=self.resumed_from,
            steps_this_attempt=t.state.step - self.start_step,
            seconds=seconds,
            images_per_s=images / seconds if seconds > 0 and images > 0 else None,
            steady_images_per_s=steady,
            flops=t.state.flops,
            best_score=None if t.best is None else t.best["score"],
            last=asdict(self.last) if self.last is not None else None,
            timings={k: round(v, 3) for k, v in self.timings.items()},
        )


def train_stage(
    trainer: Trainer,
    config: LoopConfig | None = None,
    hooks: Sequence[Hooks] = (),
    *,
    max_steps: int | None = None,
    resumed: bool = False,
) -> StageSummary:
    """Train the trainer's current stage to its end (or ``max_steps`` more steps, or the
    compute limit). ``resumed`` says that the trainer was restored from a checkpoint of this
    stage (the resume is reported and not checkpointed again)."""
    return _StageRun(trainer, config or LoopConfig(), _Dispatch(hooks), resumed).run(max_steps)


def fit(
    trainer: Trainer,
    config: LoopConfig | None = None,
    hooks: Sequence[Hooks] = (),
    *,
    until_stage: int | None = None,
    max_steps: int | None = None,
    resumed: bool = False,
) -> list[StageSummary]:
    """Train from the current state through stage ``until_stage`` (default: the last), in
    one process: :func:`train_stage` for each stage, then the warm start into the next.

    By default a divergence is not rolled back but raises :class:`DivergenceError`
    (``config.max_rollbacks`` > 0 rolls back instead, up to that many times per stage).
    ``resumed``: the trainer was restored from a checkpoint of its current stage.
    """
    config = config or LoopConfig(max_rollbacks=0)
    last = trainer.cfg.model.num_stages - 1 if until_stage is None else until_stage
    summaries = []
    left = max_steps
    while True:
        summary = train_stage(trainer, config, hooks, max_steps=left, resumed=resumed)
        resumed = False
        summaries.append(summary)
        if summary.status == "diverged":
            raise DivergenceError(summary.error or "diverged", summary.stage, summary.step)
        if left is not None:
            left -= summary.steps_this_attempt
        if summary.status == "stopped" or trainer.state.stage >= last or left == 0:
            return summaries
        trainer.advance_stage()


def step_metrics(trainer: Trainer, r: StepResult, seconds: float, world: int = 1) -> dict:
    """The curves of a training step, as every stage logs them (``world``: data-parallel
    workers, each stepping ``r.images`` images in ``seconds``)."""
    return {
        "loss": r.loss,
        "energy_data": r.e_data,
        "energy_sample": r.e_sample,
        "beta": r.beta,
        "grad_norm": r.grad_norm,
        "images_per_s": r.images * world / seconds if seconds > 0 else None,
        "stage_images": trainer.state.stage_images,
        "lr": trainer.lr,
    }


class FileCheckpoints(Hooks):
    """Checkpoints of an in-process run to one file (any fsspec URL), tagged with ``key``
    (what the run depends on), so that :func:`resume_from_file` continues only the same
    run; progress lines to ``log``."""

    def __init__(self, url: str, key: str, log=print):
        self.url, self.key, self.log = url, key, log

    def checkpoint(self, trainer, info) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint({**trainer.state_dict(), "run_key": self.key}, self.url)

    def line(self, text: str) -> None:
        self.log(text)


def resume_from_file(trainer: Trainer, url: str, key: str) -> bool:
    """Load the checkpoint at ``url`` into ``trainer`` if it exists and belongs to the run
    ``key``; True if it did."""
    from . import io as cio
    from .checkpoint import load_checkpoint

    if not cio.exists(url):
        return False
    ckpt = load_checkpoint(url, map_location=trainer.device)
    if ckpt.get("run_key") != key:
        return False
    trainer.load_state_dict(ckpt)
    return True
