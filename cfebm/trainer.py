"""Training: one contrastive step (:func:`train_step`) and a plain single-process
:class:`Trainer` over in-memory images.

The Ray layer in ``pipelines/`` wraps the same :func:`train_step` with a DDP model and a
data shard per worker; everything a resume needs is in :meth:`Trainer.state_dict`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from .config import CFEBMConfig, TrainConfig, from_dict, to_dict
from .model import EnergyNet, warm_start
from .objective import contrastive_loss, divergence
from .sampling import sample
from .schedules import fade_beta

CHECKPOINT_FORMAT = "cfebm-checkpoint/1"


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


def make_optimizer(model: torch.nn.Module, train: TrainConfig, resolution: int):
    """Adam(betas 0.5, 0.999) at the learning rate of ``resolution`` (release settings)."""
    return torch.optim.Adam(
        model.parameters(), lr=train.lr_for(resolution), betas=tuple(train.adam_betas)
    )


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


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x_data: torch.Tensor,
    cfg: CFEBMConfig,
    *,
    beta: float,
    generator: torch.Generator | None,
    base_model: EnergyNet | None = None,
    x_init: torch.Tensor | None = None,
) -> StepResult:
    """One maximum-likelihood step at the model's current stage.

    Negatives come from the coarse-to-fine chain through the frozen energies of all stages
    <= s (of ``base_model``, the unwrapped network, so no DDP hook fires while sampling);
    the loss forward goes through ``model`` (DDP-wrapped or not). A diverged step (NaN,
    inf, or magnitudes above the threshold, averaged over workers) is not stepped.
    ``x_init`` starts the chains from given images (e.g. the source domain, for one-sided
    translation, paper Sec. 3.4) instead of uniform noise.
    """
    base = base_model if base_model is not None else model
    device = x_data.device
    n = x_data.shape[0]
    x_sample = sample(base, n, cfg.sampler, beta=beta, generator=generator, x_init=x_init)
    energies = model(torch.cat([x_data, x_sample]), beta=beta)  # [2B]
    e_data, e_sample = energies[:n], energies[n:]
    loss = contrastive_loss(e_data, e_sample, cfg.train.energy_penalty)
    stats = _mean_across_workers(
        [loss.item(), e_data.mean().item(), e_sample.mean().item()], device
    )
    reason = divergence(*stats, cfg.train.divergence_threshold)
    optimizer.zero_grad(set_to_none=True)
    grad_norm = float("nan")
    if reason is None:
        loss.backward()
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
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


@dataclass
class TrainState:
    stage: int = 0
    stage_images: int = 0
    """Images trained on in the current stage (drives beta); global over workers."""
    step: int = 0
    """Optimizer steps in the current stage."""
    total_images: int = 0


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


class Trainer:
    """Coarse-to-fine training in one process on in-memory images.

    ``data`` maps each stage resolution to its images [N, C, r, r] in the [0, 255] scale
    (uint8 or float32, as the pyramid stores them). ``world_size`` counts images for beta
    when the same trainer runs on several data-parallel workers; ``wrap_model`` (e.g.
    DDP) wraps the network for the loss forward and is re-applied after every growth,
    while sampling always uses the unwrapped ``model``. With ``source`` (images per
    resolution, like ``data``) the negative chains start from source images at the stage's
    resolution instead of noise: the model learns the data domain while its short-run
    chain becomes a translator from the source domain (paper Sec. 3.4).
    """

    def __init__(
        self,
        cfg: CFEBMConfig,
        data: Mapping[int, torch.Tensor],
        device: str | torch.device = "cpu",
        *,
        model: EnergyNet | None = None,
        world_size: int = 1,
        rank: int = 0,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        source: Mapping[int, torch.Tensor] | None = None,
    ):
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        self.source = source
        self.world_size = world_size
        self.wrap_model = wrap_model
        torch.manual_seed(cfg.train.seed + 1000 * rank)
        self.model = model if model is not None else EnergyNet(cfg.model)
        self.model.to(self.device).train()
        self.state = TrainState(stage=self.model.stage)
        self.data_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(
            cfg.train.seed * 104729 + rank
        )
        self._begin_stage()

    @property
    def resolution(self) -> int:
        return self.model.resolution()

    @property
    def stage_done(self) -> bool:
        return self.state.stage_images >= self.cfg.train.stage_images(self.state.stage)

    @property
    def beta(self) -> float:
        return fade_beta(self.state.stage_images, self.cfg.train.fade_images, self.state.stage)

    def _begin_stage(self) -> None:
        r = self.resolution
        if r not in self.data:
            raise ValueError(f"no training images at resolution {r} (have {sorted(self.data)})")
        self.train_model = self.wrap_model(self.model) if self.wrap_model else self.model
        self.optimizer = make_optimizer(self.model, self.cfg.train, r)
        batch = self.cfg.train.batch_for(r)
        self.batches = EpochBatches(self.data[r], batch, self.data_gen)
        self.source_batches = None
        if self.source is not None:
            if r not in self.source:
                raise ValueError(f"no source images at resolution {r} (have {sorted(self.source)})")
            self.source_batches = EpochBatches(self.source[r], batch, self.data_gen)

    def advance_stage(self) -> None:
        """Grow into the next stage (warm start) with a fresh optimizer at its lr."""
        self.model = warm_start(self.model)
        self.model.train()
        self.state = TrainState(stage=self.model.stage, total_images=self.state.total_images)
        self._begin_stage()

    def step(self) -> StepResult:
        x = prepare_batch(self.batches.next(), self.cfg.train, self.data_gen).to(self.device)
        x_init = None
        if self.source_batches is not None:
            x_init = self.source_batches.next().float().to(self.device) / 127.5 - 1.0
        result = train_step(
            self.train_model,
            self.optimizer,
            x,
            self.cfg,
            beta=self.beta,
            generator=self.sample_gen,
            base_model=self.model,
            x_init=x_init,
        )
        if result.diverged is None:
            seen = result.images * self.world_size
            self.state.stage_images += seen
            self.state.total_images += seen
            self.state.step += 1
        return result

    def after_rollback(self, lr_factor: float = 1.0, seed_offset: int = 0) -> None:
        """Change course after restoring a checkpoint that preceded a divergence: scale the
        learning rate and/or re-seed the Langevin noise, so the same steps are not replayed.
        """
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_factor
        if seed_offset:
            seed = int(torch.randint(2**62, (1,), generator=self.data_gen)) + seed_offset
            self.sample_gen.manual_seed(seed)

    def fit(
        self,
        until_stage: int | None = None,
        max_steps: int | None = None,
        callback: Callable[[Trainer, StepResult], None] | None = None,
    ) -> None:
        """Train from the current state through stage ``until_stage`` (default: the last).

        Raises :class:`DivergenceError` on a diverged step (the model is left as it was
        before that step).
        """
        last = self.cfg.model.num_stages - 1 if until_stage is None else until_stage
        steps = 0
        while max_steps is None or steps < max_steps:
            if self.stage_done:
                if self.state.stage >= last:
                    return
                self.advance_stage()
                continue
            result = self.step()
            steps += 1
            if result.diverged is not None:
                raise DivergenceError(result.diverged, self.state.stage, self.state.step)
            if callback is not None:
                callback(self, result)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (see :mod:`cfebm.checkpoint`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": to_dict(self.cfg),
            "stage": self.model.stage,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
            "batches": self.batches.state_dict(),
            "source_batches": self.source_batches.state_dict() if self.source_batches else None,
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
            self.model = EnergyNet(self.cfg.model, stage=stage).to(self.device).train()
            self._begin_stage()
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        self.batches.load_state_dict(ckpt["batches"])
        if self.source_batches is not None and ckpt.get("source_batches"):
            self.source_batches.load_state_dict(ckpt["source_batches"])
        set_rng_state(ckpt["rng"]["global"])
        self.data_gen.set_state(ckpt["rng"]["data"])
        self.sample_gen.set_state(ckpt["rng"]["sample"])

    @classmethod
    def from_checkpoint(cls, ckpt: dict, data: Mapping[int, torch.Tensor], device="cpu", **kw):
        trainer = cls(from_dict(ckpt["config"]), data, device, **kw)
        trainer.load_state_dict(ckpt)
        return trainer


def check_format(ckpt: dict) -> None:
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"not a cfebm checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT})")


def model_from_checkpoint(ckpt: dict, device="cpu") -> EnergyNet:
    """The trained network of a checkpoint, at its stage, in eval mode."""
    check_format(ckpt)
    cfg = from_dict(ckpt["config"])
    model = EnergyNet(cfg.model, stage=int(ckpt["stage"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
