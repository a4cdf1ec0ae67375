"""The per-worker stage loop without Ray: checkpoints, exact resume, rollbacks, warm start.

``StageLoop`` only sees a ``report(metrics, checkpoint_dir, name)`` callable; here it
copies each checkpoint folder, as Ray Train's storage would.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from cfebm.checkpoint import load_checkpoint
from cfebm.config import from_dict, to_dict
from cfebm.model import EnergyNet
from cfebm.trainer import Trainer
from pipelines import pictures
from pipelines.train_loop import (
    StageJob,
    StageLoop,
    checkpoint_bytes,
    initial_model,
    model_only,
    params_finite,
    read_resume,
    reshuffle,
)

CONFIG = {
    "model": {"resolutions": [4, 8], "base_width": 4},
    "sampler": {"steps": 3},
    "train": {"batch_size": {4: 16}, "stable_images": 16 * 12, "fade_images": 16 * 4},
}


class Crash(Exception):
    pass


class Storage:
    """Stands in for Ray Train's run storage: keeps every reported checkpoint folder."""

    def __init__(self, root, crash_after: int | None = None):
        self.root, self.crash_after = root, crash_after
        self.names: list[str] = []
        self.metrics: list[dict] = []

    def __call__(self, metrics: dict, ckpt_dir: str | None, name: str | None) -> None:
        shutil.copytree(ckpt_dir, os.path.join(self.root, name))
        self.names.append(name)
        self.metrics.append(metrics)
        if self.crash_after is not None and len(self.names) >= self.crash_after:
            raise Crash(name)

    def latest(self) -> str:
        return os.path.join(self.root, self.names[-1])


def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (48, 1, 4, 4), generator=g, dtype=torch.uint8)


def job(**kw) -> StageJob:
    defaults = {"stage": 0, "config": CONFIG, "data_url": "unused", "checkpoint_every": 4}
    return StageJob(**{**defaults, **kw, "progress_every_s": 1e9})


def trainer() -> Trainer:
    return Trainer(from_dict(CONFIG), {4: images()})


def quiet(_line: str) -> None:
    pass


def test_checkpoints_every_n_and_at_the_end(tmp_path):
    storage = Storage(tmp_path)
    summary = StageLoop(trainer(), job(), storage, echo=quiet).run()
    assert summary["status"] == "completed" and summary["step"] == 12
    assert storage.names == [f"checkpoint-step{s:07d}" for s in (4, 8, 12)]
    assert [m["stage_images"] for m in storage.metrics] == [64, 128, 192]
    ckpt = load_checkpoint(os.path.join(storage.latest(), "trainer.pt"))
    assert ckpt["pipeline"] == {"world_size": 1, "rollbacks": 0}
    assert os.path.exists(os.path.join(storage.latest(), "rank0.pt"))


def test_resume_after_a_crash_continues_exactly(tmp_path):
    whole = trainer()
    StageLoop(whole, job(), Storage(tmp_path / "a"), echo=quiet).run()

    crashed = Storage(tmp_path / "b", crash_after=2)
    with pytest.raises(Crash):
        StageLoop(trainer(), job(), crashed, echo=quiet).run()
    ckpt, meta, exact = read_resume(crashed.latest(), rank=0, world=1)
    assert exact and ckpt["state"]["step"] == 8
    resumed = Trainer(from_dict(CONFIG), {4: images()}, model=EnergyNet(from_dict(CONFIG).model))
    resumed.load_state_dict(ckpt)
    summary = StageLoop(resumed, job(), Storage(tmp_path / "c"), resumed=True, meta=meta).run()

    assert summary["resumed_from_step"] == 8 and summary["steps_this_attempt"] == 4
    assert resumed.state == whole.state
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # same weights as never having stopped


def test_a_resume_with_another_worker_count_keeps_counters_and_redraws_data_order(tmp_path):
    storage = Storage(tmp_path, crash_after=1)
    with pytest.raises(Crash):
        StageLoop(trainer(), job(), storage, echo=quiet).run()
    ckpt, meta, exact = read_resume(storage.latest(), rank=1, world=2)
    assert not exact and meta["world_size"] == 1  # rank1.pt of a 2-worker run is absent
    fresh = Trainer(from_dict(CONFIG), {4: images()}, world_size=2, rank=1)
    ckpt["batches"], ckpt["rng"] = fresh.state_dict()["batches"], fresh.state_dict()["rng"]
    fresh.load_state_dict(ckpt)
    reshuffle(fresh, salt=fresh.state.step)
    assert fresh.state.step == 4 and fresh.state.stage_images == 64
    summary = StageLoop(fresh, job(), Storage(tmp_path / "b"), world=2, resumed=True).run()
    assert summary["status"] == "completed" and summary["stage_images"] >= 192


def test_resuming_a_finished_stage_writes_nothing_new(tmp_path):
    storage = Storage(tmp_path)
    StageLoop(trainer(), job(), storage, echo=quiet).run()
    ckpt, meta, _ = read_resume(storage.latest(), rank=0, world=1)
    t = trainer()
    t.load_state_dict(ckpt)
    again = Storage(tmp_path / "again")
    summary = StageLoop(t, job(), again, resumed=True, meta=meta, echo=quiet).run()
    assert summary["status"] == "already_complete" and again.names == []


def test_injected_divergence_rolls_back_lowers_lr_and_finishes(tmp_path):
    lines: list[str] = []
    storage = Storage(tmp_path)
    t = trainer()
    loop = StageLoop(t, job(inject_divergence_at_step=6), storage, echo=lines.append)
    summary = loop.run()
    assert summary["status"] == "completed" and summary["rollbacks"] == 1
    assert summary["lr"] == pytest.approx(1e-3 * 0.5)
    assert any("diverged at step 6" in line and "rolled back to step 4" in line for line in lines)
    assert params_finite(t.model) and summary["step"] == 12
    last = load_checkpoint(os.path.join(storage.latest(), "trainer.pt"))
    assert last["pipeline"]["rollbacks"] == 1  # a resume keeps counting


def test_divergence_past_the_limit_stops_with_a_clear_error(tmp_path):
    storage = Storage(tmp_path)
    j = job(inject_divergence_at_step=5, inject_divergence_times=10, max_rollbacks=2)
    summary = StageLoop(trainer(), j, storage, echo=quiet).run()
    assert summary["status"] == "diverged" and summary["rollbacks"] == 3
    assert "after 2 rollback(s)" in summary["error"] and "max_rollbacks" in summary["error"]
    assert storage.names == ["checkpoint-step0000004"]  # nothing after the divergence


def test_nan_weights_are_never_checkpointed(tmp_path):
    storage = Storage(tmp_path)
    t = trainer()
    loop = StageLoop(t, job(), storage, echo=quiet)
    loop.run()
    n = len(storage.names)
    with torch.no_grad():
        next(t.model.parameters()).fill_(math.nan)
    assert not loop._checkpoint() and len(storage.names) == n


def test_warm_start_keeps_every_earlier_stage_energy():
    t = trainer()
    t.fit(max_steps=2)
    prev = model_only(t.state_dict())
    j = job(stage=1, warm_start=checkpoint_bytes(prev))
    model = initial_model(j, from_dict(CONFIG), resuming=False)
    assert model.stage == 1
    grown = model.state_dict()
    for name, value in t.model.state_dict().items():
        assert torch.equal(grown[name], value), name
    assert any(k.startswith("from_image.r8") for k in grown)  # the new, fresh layers
    x = torch.rand(5, 1, 4, 4) * 2 - 1
    assert torch.allclose(model(x, stage=0), t.model(x))  # stage-0 energy unchanged


def test_chain_frames_run_from_noise_to_the_finest_resolution():
    cfg = from_dict(CONFIG)
    model = EnergyNet(cfg.model, stage=1)
    frames = pictures.chain_frames(model, cfg.sampler, chains=3, per_stage=3)
    assert frames.shape == (3, 1 + 2 * 3, 1, 8, 8) and frames.dtype.name == "uint8"
    png = pictures.chain_png(frames, scale=2)
    assert png[:4] == b"\x89PNG"


def test_config_roundtrip_through_the_job():
    j = job()
    assert to_dict(j.cfg) == to_dict(from_dict(CONFIG))
