"""Training state and one contrastive step: the :class:`Trainer`.

A Trainer holds everything one worker needs to continue a coarse-to-fine run exactly:
the model (every stage's network, the finished ones frozen), the optimizer of the current
stage's network, the data order, the RNG states, the counters, the replay buffer of
persistent chains and the best evaluation so far. :func:`cfebm.loop.train_stage` drives
it; the Ray Train worker, the Tune trial and the translator training are adapters around
that one loop.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from .config import CFEBMConfig, ConfigError, TrainConfig, from_dict, to_dict
from .device import energy_options
from .flops import energy_grad_flops, loss_step_flops
from .frozen import FrozenEnergy, stage_energies
from .langevin import sample_coarse_to_fine, sample_langevin, upsample2x
from .model import CoarseToFineEBM
from .objective import contrastive_loss, divergence
from .sampling import sample, uniform_noise
from .schedules import chain_schedules, fade_beta

CHECKPOINT_FORMAT = "cfebm-checkpoint/2"


class DivergenceError(RuntimeError):
    """Training diverged (NaN/inf or runaway energies); nothing was stepped or saved."""

    def __init__(self, reason: str, stage: int, step: int):
        super().__init__(f"training diverged at stage {stage}, step {step}: {reason}")
        self.reason, self.stage, self.step = reason, stage, step


@dataclass
class StepResult:
    loss: float
    e_data: float
    e_sample: float
    beta: float
    grad_norm: float
    images: int
    diverged: str | None = None
    sample_seconds: float = 0.0
    """Of the step's time, what drawing the negatives (the Langevin chains) took."""


@dataclass
class TrainState:
    stage: int = 0
    stage_images: int = 0
    """Images trained on in the current stage (drives beta); global over workers."""
    step: int = 0
    """Optimizer steps in the current stage."""
    total_images: int = 0
    rollbacks: int = 0
    """Divergences of the current stage rolled back so far."""
    flops: float = 0.0
    """Compute spent by the whole run so far (all stages, all workers), in FLOPs."""


def make_optimizer(net: torch.nn.Module, train: TrainConfig, resolution: int):
    """Adam(betas 0.5, 0.999) at the learning rate of ``resolution`` (release settings)."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=train.lr_for(resolution), betas=tuple(train.adam_betas))


def prepare_batch(
    images: torch.Tensor, train: TrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """Images in [0, 255] scale (uint8 or float) -> float [-1, 1], with flips and data noise."""
    x = images.float() / 127.5 - 1.0
    if train.hflip:
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if train.data_noise > 0:
        x = x + train.data_noise * torch.randn(x.shape, generator=generator)
    return x


def _mean_across_workers(values: list[float], device) -> list[float]:
    """Average scalars over DDP workers, so every worker makes the same decisions."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def contrastive_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x_data: torch.Tensor,
    x_sample: torch.Tensor,
    train: TrainConfig,
    beta: float,
) -> StepResult:
    """One maximum-likelihood step on data and negatives (paper Eq. 2) through ``model``
    (the current stage's network, DDP-wrapped or not). A diverged step (NaN, inf, or
    magnitudes above the threshold, averaged over workers) is not stepped."""
    n = x_data.shape[0]
    energies = model(torch.cat([x_data, x_sample]), beta=beta)  # [2B]
    e_data, e_sample = energies[:n], energies[n:]
    loss = contrastive_loss(e_data, e_sample, train.energy_penalty)
    stats = _mean_across_workers(
        [loss.item(), e_data.mean().item(), e_sample.mean().item()], x_data.device
    )
    reason = divergence(*stats, train.divergence_threshold)
    optimizer.zero_grad(set_to_none=True)
    grad_norm = float("nan")
    if reason is None:
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            reason = f"gradient norm is {grad_norm}"
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
    return StepResult(stats[0], stats[1], stats[2], beta, grad_norm, n, reason)


class EpochBatches:
    """Batches drawn without replacement, a fresh permutation per epoch; resumable."""

    def __init__(self, images: torch.Tensor, batch_size: int, generator: torch.Generator):
        if len(images) == 0:
            raise ValueError("no training images")
        self.images, self.batch_size, self.generator = images, batch_size, generator
        self.perm = torch.randperm(len(images), generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        idx, have = [], 0
        while have < self.batch_size:
            if self.pos >= len(self.perm):
                self.perm = torch.randperm(len(self.images), generator=self.generator)
                self.pos = 0
            take = min(self.batch_size - have, len(self.perm) - self.pos)
            idx.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            have += take
        return self.images[torch.cat(idx)]

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])


def _numpy_state_plain() -> tuple:
    # Plain Python types, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, keys.tolist(), int(pos), int(has_gauss), float(cached))


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_plain(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _channels_of(data: Mapping[int, torch.Tensor]) -> int:
    return int(next(iter(data.values())).shape[1])


class Trainer:
    """Coarse-to-fine training state of one worker, over in-memory images.

    ``data`` maps stage resolutions to images [N, C, r, r] in the [0, 255] scale (uint8 or
    float32, as the pyramid stores them); only the resolutions of the stages this trainer
    runs are needed. A ``cfg.model.channels`` of None is filled in from the data.
    ``world_size`` counts images for beta when the same trainer runs on several
    data-parallel workers; ``wrap_model`` (e.g. DDP) wraps the current stage's network
    for the loss forward and is re-applied after every growth, while sampling always uses
    the frozen, unwrapped energies. With ``source`` (images per resolution, like ``data``)
    the negative chains start from source images at the stage's resolution instead of
    noise: the model learns the data domain while its short-run chain becomes a translator
    from the source domain (paper Sec. 3.4).
    """

    def __init__(
        self,
        cfg: CFEBMConfig,
        data: Mapping[int, torch.Tensor],
        device: str | torch.device = "cpu",
        *,
        model: CoarseToFineEBM | None = None,
        world_size: int = 1,
        rank: int = 0,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        source: Mapping[int, torch.Tensor] | None = None,
    ):
        if cfg.model.channels is None:
            cfg = replace(cfg, model=cfg.model.with_channels(_channels_of(data)))
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        self.energy_options = energy_options(cfg.sampler, self.device)
        """dtype and compile mode of the chains' frozen energies (sampler.precision/compile)."""
        self.source = source
        self.world_size, self.rank = world_size, rank
        self.wrap_model = wrap_model
        torch.manual_seed(cfg.train.seed + 1000 * rank)
        self.model = model if model is not None else CoarseToFineEBM(cfg.model)
        self.model.to(self.device).train()
        self.state = TrainState(stage=self.model.stage)
        self.best: dict | None = None
        self.history: dict[str, list[dict]] = {"steps": [], "evaluations": []}
        """The curves of this trainer's run (:func:`cfebm.loop.train_stage` appends a row
        per step and per evaluation); checkpointed, so that a resumed run's are whole."""
        self.data_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(
            cfg.train.seed * 104729 + rank
        )
        self._begin_stage()

    # --- the stage ------------------------------------------------------------------------

    @property
    def resolution(self) -> int:
        return self.model.resolution()

    @property
    def stage_budget(self) -> int:
        """Images this stage trains on (``TrainConfig.images_for``)."""
        return self.cfg.train.images_for(self.resolution)

    @property
    def stage_done(self) -> bool:
        return self.state.stage_images >= self.stage_budget

    @property
    def beta(self) -> float:
        return fade_beta(self.state.stage_images, self.cfg.train.fade_images, self.state.stage)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _begin_stage(self) -> None:
        r = self.resolution
        if r not in self.data:
            raise ValueError(f"no training images at resolution {r} (have {sorted(self.data)})")
        current = self.model.current
        self.train_model = self.wrap_model(current) if self.wrap_model else current
        self.optimizer = make_optimizer(current, self.cfg.train, r)
        batch = self.cfg.train.batch_for(r)
        self.batches = EpochBatches(self.data[r], batch, self.data_gen)
        self.source_batches = None
        if self.source is not None:
            if r not in self.source:
                raise ValueError(f"no source images at resolution {r} (have {sorted(self.source)})")
            self.source_batches = EpochBatches(self.source[r], batch, self.data_gen)
        self.bank: torch.Tensor | None = None  # drawn on first use (train.coarse_bank)
        share = self.cfg.train.replay.get(r, 0.0)
        self.replay = None
        if share > 0:
            c = self.cfg.model.channels
            buffer = self.cfg.train.replay_buffer
            self.replay = uniform_noise(buffer, c, r, self.sample_gen, self.device)
        self._refresh_energies()

    def _refresh_energies(self) -> None:
        """Frozen energies of the finished stages (built once per stage) and FLOP counts."""
        kw = self.energy_options
        s = self.model.stage
        self.coarse = stage_energies(self.model, s - 1, **kw) if s else []
        c = self.cfg.model.channels
        self._grad_flops = [
            energy_grad_flops(e, (c, e.resolution, e.resolution), self.device)
            for e in [*self.coarse, FrozenEnergy(self.model.current)]
        ]
        r = self.model.resolution(s)
        self._loss_flops = loss_step_flops(self.model.current, (c, r, r))

    def advance_stage(self) -> None:
        """Freeze the current stage and grow into the next one (warm start), with a fresh
        optimizer at its learning rate."""
        self.model.grow()
        self.model.to(self.device).train()
        self.state = replace(
            TrainState(stage=self.model.stage),
            total_images=self.state.total_images,
            flops=self.state.flops,
        )
        self.best = None
        self._begin_stage()

    # --- one step -------------------------------------------------------------------------

    def next_batch(self) -> torch.Tensor:
        """The next batch of training images, in the [0, 255] scale."""
        return self.batches.next()

    def negatives(self, n: int) -> torch.Tensor:
        """n negative samples of the current model at its fade coefficient: coarse-to-fine
        chains from noise (or source images), a share from the replay buffer."""
        cfg = self.cfg
        energies = [
            *self.coarse,
            FrozenEnergy(self.model.current, self.beta, **self.energy_options),
        ]
        x_init = None
        if self.source_batches is not None:
            x_init = self.source_batches.next().float().to(self.device) / 127.5 - 1.0
        k = 0 if self.replay is None else round(cfg.train.replay.get(self.resolution, 0.0) * n)
        banked = cfg.train.coarse_bank and self.coarse and cfg.sampler.coarse_to_fine
        if x_init is None and banked:
            fresh = self._from_bank(n - k, energies[-1])
        else:
            fresh = sample(
                self.model,
                n - k,
                cfg.sampler,
                beta=self.beta,
                generator=self.sample_gen,
                x_init=None if x_init is None else x_init[k:],
                energies=energies,
            )
            self._count_chain(n - k, 1 if x_init is not None else len(energies))
        if k == 0:
            return fresh
        idx = torch.randint(len(self.replay), (k,), generator=self.sample_gen, device=self.device)
        replayed = sample(
            self.model,
            k,
            cfg.sampler,
            beta=self.beta,
            generator=self.sample_gen,
            x_init=self.replay[idx],
            energies=energies,
        )
        self._count_chain(k, 1)
        self.replay[idx] = replayed
        slots = torch.randint(len(self.replay), (n - k,), generator=self.sample_gen)
        self.replay[slots.to(self.device)] = fresh
        return torch.cat([replayed, fresh])

    def _from_bank(self, n: int, energy: FrozenEnergy) -> torch.Tensor:
        """n chains whose coarse part comes from the bank (train.coarse_bank), then stage
        s's own K steps with its segment of the whole chain's schedule."""
        sampler, s = self.cfg.sampler, self.model.stage
        steps, noise = chain_schedules(sampler, s + 1)
        clamp = (-1.0, 1.0) if sampler.clamp else None
        if self.bank is None:
            size, c = self.cfg.train.coarse_bank, self.cfg.model.channels
            parts = []
            for start in range(0, size, 256):
                x0 = uniform_noise(
                    min(256, size - start),
                    c,
                    self.model.resolution(0),
                    self.sample_gen,
                    self.device,
                )
                parts.append(
                    sample_coarse_to_fine(
                        self.coarse, x0, steps[:s], noise[:s], generator=self.sample_gen,
                        upsample_noise=sampler.upsample_noise, clamp=clamp,
                    )
                )  # fmt: skip
            self.bank = torch.cat(parts)  # [size, c, r_{s-1}, r_{s-1}]
            coarse = sum(self._grad_flops[t] * sampler.k(t) for t in range(s))
            self.state.flops += coarse * size * self.world_size
        idx = torch.randint(len(self.bank), (n,), generator=self.sample_gen, device=self.device)
        x = upsample2x(self.bank[idx])
        if sampler.upsample_noise > 0:
            x = x + sampler.upsample_noise * torch.randn(
                x.shape, generator=self.sample_gen, device=x.device, dtype=x.dtype
            )
            if clamp is not None:
                x = x.clamp(*clamp)
        self._count_chain(n, 1)
        return sample_langevin(
            energy, x, steps[s], noise[s], generator=self.sample_gen, clamp=clamp
        )

    def _count_chain(self, n: int, stages: int) -> None:
        sampler, s = self.cfg.sampler, self.model.stage
        if not sampler.coarse_to_fine:
            flops = self._grad_flops[-1] * sampler.chain_steps(s)
        else:
            flops = sum(self._grad_flops[t] * sampler.k(t) for t in range(s + 1 - stages, s + 1))
        self.state.flops += flops * n * self.world_size

    def step(self, batch: torch.Tensor | None = None) -> StepResult:
        """One contrastive step on ``batch`` (default: the next one) at the current stage."""
        images = self.next_batch() if batch is None else batch
        x = prepare_batch(images, self.cfg.train, self.data_gen).to(self.device)
        t0 = time.perf_counter()
        x_sample = self.negatives(x.shape[0])
        sample_seconds = time.perf_counter() - t0
        result = contrastive_step(
            self.train_model, self.optimizer, x, x_sample, self.cfg.train, self.beta
        )
        result.sample_seconds = sample_seconds
        self.state.flops += self._loss_flops * 2 * x.shape[0] * self.world_size
        if result.diverged is None:
            seen = result.images * self.world_size
            self.state.stage_images += seen
            self.state.total_images += seen
            self.state.step += 1
        return result

    def change_course(self, lr_factor: float = 1.0, reseed: bool = False) -> None:
        """After restoring a checkpoint that preceded a divergence: scale the learning rate
        and/or re-seed the Langevin noise, so the same steps are not replayed."""
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_factor
        if reseed:
            seed = int(torch.randint(2**62, (1,), generator=self.data_gen)) + self.state.rollbacks
            self.sample_gen.manual_seed(seed)

    def reshuffle(self, salt: int) -> None:
        """New data order and Langevin noise for this rank (after a resume with another
        number of workers, whose per-rank states do not carry over)."""
        seed = self.cfg.train.seed * 7919 + 1_000_003 * (salt + 1) + 31 * self.rank
        self.data_gen.manual_seed(seed)
        self.sample_gen.manual_seed(seed + 17)
        r = self.resolution
        self.batches = EpochBatches(self.data[r], self.cfg.train.batch_for(r), self.data_gen)

    def remember_best(self, score: float) -> bool:
        """Keep the current network as the stage's best if ``score`` (lower is better) beats
        the best so far; True if it did."""
        if self.best is not None and not score < self.best["score"]:
            return False
        weights = {k: v.detach().clone() for k, v in self.model.current.state_dict().items()}
        self.best = {
            "score": float(score),
            "step": self.state.step,
            "stage_images": self.state.stage_images,
            "model": weights,
        }
        return True

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (see :mod:`cfebm.checkpoint`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": to_dict(self.cfg),
            "stage": self.model.stage,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
            "best": copy.deepcopy(self.best),
            "history": copy.deepcopy(self.history),
            "batches": self.batches.state_dict(),
            "source_batches": self.source_batches.state_dict() if self.source_batches else None,
            "replay": None if self.replay is None else self.replay.clone(),
            "bank": None if self.bank is None else self.bank.clone(),
            "rng": {
                "global": rng_state(),
                "data": self.data_gen.get_state(),
                "sample": self.sample_gen.get_state(),
            },
        }

    def load_state_dict(self, ckpt: dict) -> None:
        check_format(ckpt)
        stage = int(ckpt["stage"])
        if stage != self.model.stage:
            self.model = CoarseToFineEBM(self.cfg.model, stage=stage).to(self.device).train()
            self._begin_stage()
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        self.best = copy.deepcopy(ckpt.get("best"))
        self.history = copy.deepcopy(ckpt.get("history") or {"steps": [], "evaluations": []})
        self.batches.load_state_dict(ckpt["batches"])
        if self.source_batches is not None and ckpt.get("source_batches"):
            self.source_batches.load_state_dict(ckpt["source_batches"])
        if self.replay is not None and ckpt.get("replay") is not None:
            self.replay = ckpt["replay"].to(self.device)
        bank = ckpt.get("bank")
        self.bank = None if bank is None else bank.to(self.device)
        set_rng_state(ckpt["rng"]["global"])
        self.data_gen.set_state(ckpt["rng"]["data"])
        self.sample_gen.set_state(ckpt["rng"]["sample"])
        self._refresh_energies()

    def model_state(self) -> dict:
        """This stage's result as a model file (:func:`model_file`)."""
        return model_file(self.state_dict())

    @classmethod
    def from_checkpoint(cls, ckpt: dict, data: Mapping[int, torch.Tensor], device="cpu", **kw):
        trainer = cls(from_dict(ckpt["config"]), data, device, **kw)
        trainer.load_state_dict(ckpt)
        return trainer


def check_format(ckpt: dict) -> None:
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == "cfebm-checkpoint/1":
        raise ValueError(
            "a cfebm-checkpoint/1 file, from a cfebm whose stages shared one network; the "
            "energies of finished stages now stay frozen, so retrain it with this version"
        )
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"not a cfebm checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT})")


def model_file(ckpt: dict, config: CFEBMConfig | None = None) -> dict:
    """A stage's model file from a trainer checkpoint: every stage's network (the current
    stage's best evaluated one when the loop kept it), the config (``config``, e.g. the
    global one of a data-parallel run) and the counters; no optimizer or data state."""
    check_format(ckpt)
    model = dict(ckpt["model"])
    best = ckpt.get("best")
    if best is not None:
        prefix = f"nets.{int(ckpt['stage'])}."
        model.update({prefix + k: v for k, v in best["model"].items()})
    return {
        "format": CHECKPOINT_FORMAT,
        "config": to_dict(config) if config is not None else ckpt["config"],
        "stage": int(ckpt["stage"]),
        "model": model,
        "state": dict(ckpt["state"]),
        "best": None if best is None else {k: v for k, v in best.items() if k != "model"},
    }


def model_from_checkpoint(ckpt: dict, device="cpu") -> CoarseToFineEBM:
    """The trained model of a checkpoint (every stage's network), in eval mode."""
    check_format(ckpt)
    cfg = from_dict(ckpt["config"])
    model = CoarseToFineEBM(cfg.model, stage=int(ckpt["stage"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def params_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def next_stage_model(previous: dict, stage: int, seed: int, device="cpu") -> CoarseToFineEBM:
    """The model stage ``stage`` starts from: the model file of stage ``stage - 1`` grown by
    one stage (warm start), its new layers drawn from ``seed`` so that every data-parallel
    worker starts from the same weights."""
    model = model_from_checkpoint(previous, device)
    if model.stage != stage - 1:
        raise ValueError(
            f"stage {stage} starts from a stage-{stage - 1} model, got stage {model.stage}"
        )
    torch.manual_seed(seed + stage)
    model.grow()
    return model.train()


def stage_trainer(
    cfg: CFEBMConfig,
    stage: int,
    data: Mapping[int, torch.Tensor],
    previous: dict | None = None,
    state: dict | None = None,
    *,
    exact: bool = True,
    **kw,
) -> Trainer:
    """The trainer of stage ``stage``: resumed from ``state`` (a trainer checkpoint; not
    ``exact`` when it was saved by another number of workers, so the data order is drawn
    anew), else warm-started from ``previous`` (stage - 1's model file, whose image and
    compute counters it carries on). ``kw`` goes to :class:`Trainer`."""
    if state is None and stage > 0 and previous is None:
        raise ValueError(f"stage {stage} starts from stage {stage - 1}'s model file")
    device = kw.pop("device", "cpu")
    if state is not None:
        model = CoarseToFineEBM(cfg.model, stage)  # its weights come from the checkpoint
    else:
        model = next_stage_model(previous, stage, cfg.train.seed, device) if stage else None
    trainer = Trainer(cfg, data, device, model=model, **kw)
    if state is not None:
        trainer.load_state_dict(state)
        if not exact:
            trainer.reshuffle(salt=trainer.state.step)
    elif stage > 0:
        trainer.state.total_images = int(previous["state"]["total_images"])
        trainer.state.flops = float(previous["state"]["flops"])
    return trainer


def stage_metrics(model_ckpt: dict, summary: dict) -> dict:
    """The results of a finished stage (its model file and loop summary) as DVC metrics."""
    state, last = model_ckpt["state"], summary.get("last") or {}
    return {
        "stage": int(model_ckpt["stage"]),
        "resolution": from_dict(model_ckpt["config"]).model.resolutions[model_ckpt["stage"]],
        "step": state["step"],
        "stage_images": state["stage_images"],
        "total_images": state["total_images"],
        "rollbacks": state["rollbacks"],
        "lr": summary.get("lr"),
        "gflops": round(state["flops"] / 1e9, 3),
        "loss": last.get("loss"),
        "energy_data": last.get("e_data"),
        "energy_sample": last.get("e_sample"),
        "best_score": (model_ckpt.get("best") or {}).get("score"),
    }


def per_worker(cfg: CFEBMConfig, workers: int) -> CFEBMConfig:
    """The config each of ``workers`` data-parallel workers runs: the global batches split
    evenly, so the images per step (and the beta schedule) do not depend on ``workers``."""
    if workers == 1:
        return cfg
    split = {}
    for r, b in cfg.train.batch_size.items():
        if b % workers:
            raise ConfigError(
                f"batch_size at {r}x{r} is {b}, which {workers} workers cannot split evenly: "
                f"use a multiple of {workers} (batch sizes are global)"
            )
        split[r] = b // workers
    return replace(cfg, train=replace(cfg.train, batch_size=split))


def check_training_data(cfg: CFEBMConfig, store, stage: int) -> CFEBMConfig:
    """``cfg`` with the channels of the pyramid ``store``, or ConfigError saying what to set
    when the data cannot train ``stage`` (a level missing, a batch above the data size)."""
    if not 0 <= stage < cfg.model.num_stages:
        raise ConfigError(
            f"stage {stage}: model.resolutions {list(cfg.model.resolutions)} has stages "
            f"0..{cfg.model.num_stages - 1}"
        )
    cfg = replace(cfg, model=cfg.model.with_channels(store.channels))
    r = cfg.model.resolutions[stage]
    if r not in store.resolutions:
        raise ConfigError(
            f"{store.url} has no level at {r}x{r} for stage {stage} (it has "
            f"{store.resolutions}): build the pyramid down to (and prepare it up to) "
            f"model.resolutions {list(cfg.model.resolutions)}"
        )
    batch, count = cfg.train.batch_for(r), store.count("train")
    if batch > count:
        raise ConfigError(
            f"batch_size at {r}x{r} is {batch}, more than the {count} training images of "
            f"{store.url}: lower it to at most {count}"
        )
    return cfg


def load_previous_stage(url: str, model_cfg, stage: int) -> tuple[dict, str]:
    """(the model file of stage ``stage - 1`` at ``url``, its sha256): checked to be a
    stage-(s-1) model of the network ``model_cfg`` describes, which stage s grows."""
    import hashlib

    from . import io as cio
    from .checkpoint import load_checkpoint

    if not cio.exists(url):
        raise ConfigError(
            f"stage {stage} starts from stage {stage - 1}'s model, but {url} does not exist: "
            f"train stage {stage - 1} first"
        )
    ckpt = load_checkpoint(url)
    prev = model_from_checkpoint(ckpt)
    if prev.cfg != model_cfg or prev.stage != stage - 1:
        raise ConfigError(
            f"{url} is a stage-{prev.stage} model of another network ({prev.cfg}), not the "
            f"stage-{stage - 1} model that stage {stage} of {model_cfg} grows; retrain it "
            "with the current settings"
        )
    return ckpt, hashlib.sha256(cio.read_bytes(url)).hexdigest()


def sampler_of(ckpt: dict, **overrides) -> tuple:
    """(the sampler settings a model file was trained with, ``overrides`` laid over them,
    and the fade coefficient beta of its last stage when it was saved)."""
    cfg = from_dict(ckpt["config"])
    state = ckpt.get("state") or {}
    beta = fade_beta(int(state.get("stage_images", 0)), cfg.train.fade_images, int(ckpt["stage"]))
    try:
        sampler = replace(cfg.sampler, **overrides)
    except TypeError as e:
        raise ConfigError(f"sampler overrides: {e}") from None
    return sampler, beta if state else 1.0
