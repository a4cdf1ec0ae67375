"""What every Ray Train worker runs for one coarse-to-fine stage.

:func:`train_loop_per_worker` is the only function here that touches Ray: it reads the
worker's data shard, builds a :class:`cfebm.trainer.Trainer` (warm-started from the
previous stage, or restored from the run's latest checkpoint) with a DDP-wrapped model,
and hands it to :class:`StageLoop`, which trains the stage to its end with checkpoints,
divergence rollbacks, progress lines and (rank 0) MLflow logging. StageLoop only sees a
``report`` callable, so tests drive it without Ray.

Checkpoint layout (one folder per checkpoint in the run storage, merged from all workers):

    trainer.pt    rank 0: the cfebm checkpoint (all stage weights, optimizer, counters,
                  RNG, data order, config) plus ``pipeline`` metadata (world size,
                  rollbacks so far)
    rank<r>.pt    every rank: its own data order and RNG states, so a resume with the
                  same number of workers continues exactly
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import CFEBMConfig, from_dict
from cfebm.data import PyramidStore, shards_for_worker
from cfebm.model import EnergyNet, warm_start
from cfebm.trainer import EpochBatches, StepResult, Trainer, model_from_checkpoint
from pipelines import pictures
from pipelines.train_params import worker_config

TRAINER_FILE = "trainer.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


@dataclass
class StageJob:
    """Everything a worker needs to train one stage (plain data, sent to every worker)."""

    stage: int
    config: dict
    """The resolved (global-batch) cfebm config, ``cfebm.config.to_dict``."""
    data_url: str
    data_options: dict = field(default_factory=dict)
    warm_start: bytes | None = None
    """Stage s > 0: the previous stage's model (a model-only cfebm checkpoint)."""
    start_total_images: int = 0
    """Images trained on in the stages before (continues the total_images counter)."""
    checkpoint_every: int = 100
    max_rollbacks: int = 3
    lr_factor: float = 0.5
    reseed: bool = True
    progress_every_s: float = 10.0
    threads: int = 1
    use_gpu: bool = False
    tracking_uri: str | None = None
    run_id: str | None = None
    log_every: int = 1
    sample_every: int = 0
    num_samples: int = 64
    warmup_steps: int = 0
    """Steps of an attempt left out of its ``steady_images_per_s`` (benchmarks)."""
    inject_divergence_at_step: int | None = None
    inject_divergence_times: int = 1

    @property
    def cfg(self) -> CFEBMConfig:
        return from_dict(self.config)


# --- data and model ------------------------------------------------------------------------


def load_worker_images(
    url: str, options: dict, resolution: int, rank: int, world: int
) -> tuple[torch.Tensor, str]:
    """This worker's training images [n, C, r, r] in the [0, 255] scale, and how it got them.

    With at least as many shards as workers, each worker reads its own shards
    (``shards_for_worker``). With fewer (a small dataset written as one shard), every
    worker reads all of them and draws its own permutation (the trainer's data generator
    is seeded by rank): each step's global batch is then a set of independent draws
    rather than a partition of an epoch, which SGD does not mind, and no worker idles.
    """
    store = PyramidStore(url, options)
    n = store.num_shards("train")
    if n >= world:
        shards = shards_for_worker(n, rank, world)
        how = f"shards {shards} of {n}"
    else:
        shards = list(range(n))
        how = f"all {n} shard(s) (fewer shards than {world} workers: per-rank permutations)"
    images = np.array(store.read("train", resolution, shards))  # a copy, off the memory map
    return torch.from_numpy(images), how


def model_only(ckpt: dict) -> dict:
    """A cfebm checkpoint reduced to what warm start and sampling need."""
    keep = ("format", "config", "stage", "model")
    return {k: ckpt[k] for k in keep}


def checkpoint_bytes(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def initial_model(job: StageJob, cfg: CFEBMConfig, resuming: bool) -> EnergyNet | None:
    """The network a stage starts from.

    Stage 0 starts fresh (None: the Trainer builds it). Stage s > 0 starts from stage
    s-1's final model grown by one stage (:func:`cfebm.model.warm_start`: every earlier
    stage energy is kept, since sampling runs through all of them). When resuming, the
    weights come from the checkpoint, so only the architecture is built.
    """
    if resuming:
        return EnergyNet(cfg.model, stage=job.stage)
    if job.stage == 0:
        return None
    if job.warm_start is None:
        raise ValueError(f"stage {job.stage} needs the model of stage {job.stage - 1}")
    prev_ckpt = torch.load(io.BytesIO(job.warm_start), map_location="cpu", weights_only=True)
    prev = model_from_checkpoint(prev_ckpt)
    if prev.stage != job.stage - 1:
        raise ValueError(f"warm start for stage {job.stage} got a stage-{prev.stage} model")
    torch.manual_seed(cfg.train.seed + job.stage)  # the new layers start equal on all ranks
    return warm_start(prev)


def read_resume(ckpt_dir: str, rank: int, world: int) -> tuple[dict, dict, bool]:
    """``(trainer checkpoint for this rank, pipeline metadata, exact)`` from a checkpoint
    folder. ``exact`` is False when the worker count changed: the data order and RNG
    of this rank are then drawn afresh (see :func:`reshuffle`)."""
    ckpt = load_checkpoint(os.path.join(ckpt_dir, TRAINER_FILE))
    meta = dict(ckpt.pop("pipeline", {}))
    own = os.path.join(ckpt_dir, rank_file(rank))
    exact = meta.get("world_size") == world and os.path.exists(own)
    if exact:
        mine = torch.load(own, map_location="cpu", weights_only=True)
        ckpt["batches"], ckpt["rng"] = mine["batches"], mine["rng"]
    return ckpt, meta, exact


def reshuffle(trainer: Trainer, salt: int) -> None:
    """New data order and Langevin noise for this rank (after a change of worker count)."""
    seed = trainer.cfg.train.seed * 7919 + 1_000_003 * (salt + 1)
    trainer.data_gen.manual_seed(seed + int(torch.randint(1 << 30, (1,))))
    trainer.sample_gen.manual_seed(seed + 17 + int(torch.randint(1 << 30, (1,))))
    r = trainer.resolution
    batch = trainer.cfg.train.batch_for(r)
    trainer.batches = EpochBatches(trainer.data[r], batch, trainer.data_gen)


def params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def echo(line: str) -> None:
    """Print one line from a worker (unbuffered; Ray Train's print patch would double it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- the loop ------------------------------------------------------------------------------

Report = Callable[[dict, "str | None", "str | None"], None]
"""report(metrics, checkpoint_dir or None, checkpoint name or None); called on every rank."""


class StageLoop:
    """Trains ``trainer`` to the end of its stage.

    Every ``checkpoint_every`` steps and at the end, all ranks write their part of a
    checkpoint and call ``report`` (the same number of times on every rank, as Ray Train
    requires). A diverged step (the trainer does not apply it; the decision is the same
    on every rank, since the statistics are averaged over workers) restores the last good
    checkpoint, lowers the learning rate and re-seeds the Langevin noise; after
    ``max_rollbacks`` the stage stops with status ``diverged``. Weights are checked to be
    finite before each checkpoint, so no checkpoint and no final model holds a NaN.
    """

    def __init__(
        self,
        trainer: Trainer,
        job: StageJob,
        report: Report,
        *,
        rank: int = 0,
        world: int = 1,
        resumed: bool = False,
        meta: dict | None = None,
        logger=None,
        echo: Callable[[str], None] = echo,
    ):
        self.trainer, self.job, self.report = trainer, job, report
        self.rank, self.world = rank, world
        self.logger = logger if rank == 0 else None
        self.echo = echo if rank == 0 else (lambda _msg: None)
        meta = meta or {}
        self.rollbacks = int(meta.get("rollbacks", 0))
        self.resumed_from = trainer.state.step if resumed else None
        self.injections = 0
        self.last_result: StepResult | None = None
        self.last_checkpoint_step = trainer.state.step if resumed else None
        self.error: str | None = None

    # --- state snapshots ---------------------------------------------------------------

    def _snapshot(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.trainer.state_dict(), buf)
        return buf.getvalue()

    def _restore(self, snapshot: bytes) -> None:
        buf = io.BytesIO(snapshot)
        self.trainer.load_state_dict(
            torch.load(buf, map_location=self.trainer.device, weights_only=True)
        )

    def _lr(self) -> float:
        return float(self.trainer.optimizer.param_groups[0]["lr"])

    # --- the steps ---------------------------------------------------------------------

    def _maybe_inject(self) -> None:
        """TEST HOOK (train.debug.inject_divergence_at_step): NaN images for this step."""
        at = self.job.inject_divergence_at_step
        if at is None or self.trainer.state.step != at:
            return
        if self.injections >= self.job.inject_divergence_times:
            return
        self.injections += 1
        batches = self.trainer.batches
        real_next = batches.next

        def poisoned() -> torch.Tensor:
            del batches.next  # back to the class method after one batch
            return real_next().float() * float("nan")

        batches.next = poisoned

    def run(self) -> dict:
        t = self.trainer
        self.good = self._snapshot()
        self.start_step = t.state.step
        self.start_images = t.state.stage_images
        self.t0 = time.monotonic()
        self.steady_from = (self.t0, t.state.stage_images) if self.job.warmup_steps == 0 else None
        self.steady_until = self.steady_from
        self._last_progress = self.t0
        self.rate = float("nan")
        if self.resumed_from is not None:
            self.echo(
                f"[stage {t.state.stage}] resumed from the checkpoint at step {t.state.step} "
                f"({t.state.stage_images} images, beta {t.beta:.3f}, {self.rollbacks} rollbacks)"
            )
            if self.logger:
                self.logger.metrics(t.state.step, {"resumed_from_step": t.state.step})
        while not t.stage_done:
            self._maybe_inject()
            t_step = time.monotonic()
            result = t.step()
            dt = time.monotonic() - t_step
            if result.diverged is not None:
                if not self._rollback(result.diverged):
                    return self._finish("diverged")
                continue
            self.last_result = result
            if t.state.step - self.start_step == self.job.warmup_steps:
                self.steady_from = (time.monotonic(), t.state.stage_images)
            self._after_step(result, dt)
            self.steady_until = (time.monotonic(), t.state.stage_images)
            due = t.state.step % self.job.checkpoint_every == 0 and not t.stage_done
            if due and not self._checkpoint() and not self._rollback("non-finite weights"):
                return self._finish("diverged")
        if self.last_checkpoint_step != t.state.step and not self._checkpoint():
            # Non-finite final weights: never written; the next run resumes the last good one.
            self.error = f"stage {t.state.stage}: the final weights are not finite"
            return self._finish("diverged")
        self._progress(force=True)
        return self._finish("completed" if self.start_step < t.state.step else "already_complete")

    def _after_step(self, r: StepResult, dt: float) -> None:
        t = self.trainer
        seen = r.images * self.world
        inst = seen / dt if dt > 0 else float("nan")
        elapsed = time.monotonic() - self.t0
        done = t.state.stage_images - self.start_images
        self.rate = done / elapsed if elapsed > 0 else float("nan")
        step = t.state.step
        if self.logger and step % self.job.log_every == 0:
            self.logger.metrics(
                step,
                {
                    "loss": r.loss,
                    "energy_data": r.e_data,
                    "energy_sample": r.e_sample,
                    "beta": r.beta,
                    "grad_norm": r.grad_norm,
                    "images_per_s": inst,
                    "stage_images": t.state.stage_images,
                    "lr": self._lr(),
                },
            )
        if self.logger and self.job.sample_every and step % self.job.sample_every == 0:
            self._log_samples(step)
        self._progress()

    def _log_samples(self, step: int) -> None:
        t = self.trainer
        images = pictures.sample_images(
            t.model, t.cfg.sampler, self.job.num_samples, seed=t.cfg.train.seed + 4242, beta=t.beta
        )
        self.logger.image(pictures.grid(images, scale=2), key="samples", step=step)

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.job.progress_every_s:
            return
        self._last_progress = now
        t, r = self.trainer, self.last_result
        total = t.cfg.train.stage_images(t.state.stage)
        left = max(0, total - t.state.stage_images)
        res = t.resolution
        line = (
            f"[stage {t.state.stage} {res}x{res}] step {t.state.step} | beta {t.beta:.3f} | "
            f"images {t.state.stage_images}/{total} ({100 * t.state.stage_images / total:.0f}%)"
        )
        if r is not None:
            eta = _fmt_time(left / self.rate if self.rate else math.inf)
            line += (
                f" | loss {r.loss:+.4f} | E data {r.e_data:+.3f} sample {r.e_sample:+.3f}"
                f" | {self.rate:.0f} img/s | ETA {eta}"
            )
        self.echo(line)

    # --- checkpoints and rollbacks -----------------------------------------------------

    def _checkpoint(self) -> bool:
        """Write and report a checkpoint of the current state; False (nothing written) if
        the weights are not finite. The decision is the same on every rank."""
        t = self.trainer
        if not params_finite(t.model):
            return False
        step = t.state.step
        name = f"checkpoint-step{step:07d}"
        r = self.last_result
        metrics = {
            "stage": t.state.stage,
            "step": step,
            "stage_images": t.state.stage_images,
            "beta": t.beta,
            "rollbacks": self.rollbacks,
            **({"loss": r.loss, "energy_data": r.e_data, "energy_sample": r.e_sample} if r else {}),
        }
        state = t.state_dict()
        with tempfile.TemporaryDirectory(prefix="cfebm-ckpt-") as d:
            if self.rank == 0:
                meta = {"world_size": self.world, "rollbacks": self.rollbacks}
                save_checkpoint({**state, "pipeline": meta}, os.path.join(d, TRAINER_FILE))
            own = {"batches": state["batches"], "rng": state["rng"]}
            torch.save(own, os.path.join(d, rank_file(self.rank)))
            self.report(metrics, d, name)
        self.good = self._snapshot()
        self.last_checkpoint_step = step
        if self.logger:
            self.logger.flush()
        return True

    def _rollback(self, reason: str) -> bool:
        """Restore the last good state with a lower lr and new noise; False when the
        rollback budget is spent (``self.error`` says why)."""
        t = self.trainer
        at = t.state.step
        self.rollbacks += 1
        if self.rollbacks > self.job.max_rollbacks:
            self.error = (
                f"stage {t.state.stage} diverged at step {at} ({reason}) after "
                f"{self.rollbacks - 1} rollback(s), the limit (train.rollback.max_rollbacks). "
                "Lower the learning rate (train.optim.lr), the Langevin step size "
                "(train.sampler.step_size) or raise train.optim.energy_penalty, then re-run."
            )
            self.echo(f"error: {self.error}")
            return False
        lr = self._lr() * self.job.lr_factor
        self._restore(self.good)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        t.after_rollback(1.0, seed_offset=self.rollbacks if self.job.reseed else 0)
        self.echo(
            f"[stage {t.state.stage}] diverged at step {at}: {reason}; rolled back to step "
            f"{t.state.step} (rollback {self.rollbacks}/{self.job.max_rollbacks}), lr -> {lr:.3g}"
            + (", new Langevin noise" if self.job.reseed else "")
        )
        if self.logger:
            self.logger.metrics(at, {"rollbacks": self.rollbacks, "lr": lr})
        return True

    def _steady_rate(self) -> float | None:
        """Images/s from the end of step ``warmup_steps`` of this attempt to its last step
        (periodic checkpoints and rank-0 logging included, the final checkpoint not)."""
        if self.steady_from is None or self.steady_until is None:
            return None
        (t_from, images_from), (t_until, images_until) = self.steady_from, self.steady_until
        seconds = t_until - t_from
        images = images_until - images_from
        return images / seconds if seconds > 0 and images > 0 else None

    def _finish(self, status: str) -> dict:
        t, r = self.trainer, self.last_result
        seconds = time.monotonic() - self.t0
        images = t.state.stage_images - self.start_images
        if self.logger:
            self.logger.flush()
        return {
            "status": status,
            "error": self.error,
            "stage": t.state.stage,
            "step": t.state.step,
            "stage_images": t.state.stage_images,
            "total_images": t.state.total_images,
            "beta": t.beta,
            "lr": self._lr(),
            "rollbacks": self.rollbacks,
            "resumed_from_step": self.resumed_from,
            "steps_this_attempt": t.state.step - self.start_step,
            "seconds_this_attempt": seconds,
            "images_per_s": images / seconds if seconds > 0 and images > 0 else None,
            "steady_images_per_s": self._steady_rate(),
            "world_size": self.world,
            "last": asdict(r) if r is not None else None,
        }


# --- Ray -----------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point: one worker's part of one stage (returns rank 0's summary)."""
    import ray.train
    import ray.train.torch

    from pipelines.tracking import RunLogger

    job = StageJob(**config)
    # Ray 2.60 logs every report at INFO through a logger named after its file path, which
    # LoggingConfig does not reach; this worker's own lines go to stdout, not to logging.
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.threads)
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    cfg = job.cfg
    resolution = cfg.model.resolutions[job.stage]
    images, how = load_worker_images(job.data_url, job.data_options, resolution, rank, world)
    echo(f"[rank {rank}/{world}] {len(images)} images at {resolution}x{resolution}: {how}")

    resume, meta, exact = None, {}, True
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume, meta, exact = read_resume(d, rank, world)

    def wrap(model: EnergyNet) -> torch.nn.Module:
        # After an expansion the fade path is unused once beta reaches 1: DDP must not
        # wait for its gradients. Stage 0 uses every parameter in every step.
        unused = {"find_unused_parameters": model.stage > 0}
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=unused)

    trainer = Trainer(
        worker_config(cfg, world),
        {resolution: images},
        device,
        model=initial_model(job, cfg, resuming=resume is not None),
        world_size=world,
        rank=rank,
        wrap_model=wrap,
    )
    if resume is not None:
        if not exact:
            fresh = trainer.state_dict()
            resume["batches"], resume["rng"] = fresh["batches"], fresh["rng"]
        trainer.load_state_dict(resume)
        if not exact:
            reshuffle(trainer, salt=trainer.state.step)
    else:
        trainer.state.total_images = job.start_total_images

    def report(metrics: dict, ckpt_dir: str | None, name: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    logger = None
    if rank == 0 and job.tracking_uri and job.run_id:
        logger = RunLogger(job.tracking_uri, job.run_id)
    loop = StageLoop(
        trainer,
        job,
        report,
        rank=rank,
        world=world,
        resumed=resume is not None,
        meta=meta,
        logger=logger,
    )
    return loop.run()
