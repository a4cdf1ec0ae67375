"""The trainer and the one training loop (cfebm.loop): frozen stage energies, the fade
schedule, exact resume, checkpoints, divergence rollbacks, best-model selection, replay
buffers, compute counting; the hooks a worker, a trial or a script plugs in."""

import math
from dataclasses import replace
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from cfebm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_worker_checkpoint,
    save_checkpoint,
    save_worker_checkpoint,
)
from cfebm.config import CFEBMConfig, ConfigError, ModelConfig, SamplerConfig, TrainConfig
from cfebm.loop import (
    FaultInjection,
    FileCheckpoints,
    Hooks,
    InjectDivergence,
    LoopConfig,
    MetricsLog,
    fit,
    resume_from_file,
    train_stage,
)
from cfebm.objective import contrastive_loss, divergence
from cfebm.sampling import draw, sample
from cfebm.trainer import (
    DivergenceError,
    Trainer,
    model_file,
    model_from_checkpoint,
    next_stage_model,
    per_worker,
)


def tiny_cfg(**train) -> CFEBMConfig:
    t = dict(batch_size={4: 8}, lr={4: 2e-3}, fade_images=32, stable_images=32, seed=3)
    t.update(train)
    return CFEBMConfig(
        model=ModelConfig(resolutions=(4, 8, 16), base_width=4),
        sampler=SamplerConfig(steps=3, noise_start=0.01),
        train=TrainConfig(**t),
    )


def pyramid(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x16 = (torch.rand((n, 1, 16, 16), generator=g) * 255).round().to(torch.uint8)
    x8 = F.avg_pool2d(x16.float(), 2)
    return {16: x16, 8: x8, 4: F.avg_pool2d(x8, 2)}


def params_of(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


class Record(Hooks):
    """Keeps what the loop reports."""

    def __init__(self):
        self.steps, self.checkpoints, self.events, self.lines = [], [], [], []

    def after_step(self, t, r, seconds):
        self.steps.append((t.state.stage, t.state.step, r.beta))

    def checkpoint(self, t, info):
        self.checkpoints.append((info["name"], t.state_dict()))

    def event(self, name, info):
        self.events.append((name, info))

    def line(self, text):
        self.lines.append(text)


def test_finished_stage_energies_stay_exactly_as_their_stage_left_them():
    """E_t (t < s) on fixed inputs, and seeded samples at stage t, are bit-identical after
    training stage s to what they were at the end of stage t."""
    trainer = Trainer(tiny_cfg(), pyramid())
    x = {
        t: torch.rand((6, 1, r, r), generator=torch.Generator().manual_seed(t)) * 2 - 1
        for t, r in enumerate((4, 8))
    }
    energies, samples = {}, {}
    for t in range(2):
        fit(trainer, until_stage=t)
        with torch.no_grad():
            energies[t] = trainer.model(x[t], stage=t)
        samples[t] = draw(trainer.model, trainer.cfg.sampler, 8, seed=11, stage=t)
        trainer.advance_stage()
    fit(trainer, max_steps=3)  # train stage 2 for a few steps
    assert trainer.model.stage == 2 and trainer.state.step == 3
    for t in range(2):
        with torch.no_grad():
            assert torch.equal(trainer.model(x[t], stage=t), energies[t]), t
        assert (draw(trainer.model, trainer.cfg.sampler, 8, seed=11, stage=t) == samples[t]).all()


def test_n_plus_m_steps_equal_n_then_save_load_then_m(tmp_path):
    data = pyramid()
    straight = Trainer(tiny_cfg(), data)
    fit(straight, max_steps=11)  # stage 0 (8 steps: fade + stable), then into stage 1's fade
    first = Trainer(tiny_cfg(), data)
    fit(first, max_steps=5)
    url = str(tmp_path / "ckpt" / "last.pt")
    save_checkpoint(first.state_dict(), url)
    del first
    torch.manual_seed(999)  # a different process state must not matter
    resumed = Trainer.from_checkpoint(load_checkpoint(url), data)
    fit(resumed, max_steps=6, resumed=True)
    assert resumed.state == straight.state
    assert resumed.state.stage == 1 and 0 < resumed.beta < 1  # mid-fade, not restarted
    a, b = params_of(straight), params_of(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_stage_trains_its_budget_the_first_at_beta_one():
    trainer = Trainer(tiny_cfg(images={4: 24}), pyramid())
    rec = Record()
    fit(trainer, hooks=[rec])
    assert trainer.model.stage == 2
    assert [s for s, _, _ in rec.steps] == [0] * 3 + [1] * 8 + [2] * 8
    stage1 = [b for s, _, b in rec.steps if s == 1]
    assert stage1[:4] == [0.0, 0.25, 0.5, 0.75]  # each step's beta, before its images count
    assert stage1[4:] == [1.0] * 4 and all(b == 1.0 for s, _, b in rec.steps if s == 0)
    assert trainer.state.total_images == 19 * 8
    assert trainer.state.flops > 0


def test_loop_checkpoints_every_n_steps_and_at_the_end():
    trainer = Trainer(tiny_cfg(images={4: 96}), pyramid())
    rec = Record()
    summary = train_stage(trainer, LoopConfig(checkpoint_every=4), [rec])
    assert summary.status == "completed" and summary.step == 12
    assert [n for n, _ in rec.checkpoints] == [f"checkpoint-step{s:07d}" for s in (4, 8, 12)]
    again = train_stage(trainer, LoopConfig(checkpoint_every=4), [rec], resumed=True)
    assert again.status == "already_complete" and len(rec.checkpoints) == 3


def test_injected_divergence_rolls_back_lowers_lr_and_finishes():
    trainer = Trainer(tiny_cfg(images={4: 96}), pyramid())
    rec = Record()
    loop = LoopConfig(checkpoint_every=4, lr_factor=0.5)
    summary = train_stage(trainer, loop, [rec, InjectDivergence(at_step=6)])
    assert summary.status == "completed" and summary.rollbacks == 1 and summary.step == 12
    assert summary.lr == pytest.approx(2e-3 * 0.5)
    assert any(
        "diverged at step 6" in line and "rolled back to step 4" in line for line in rec.lines
    )
    assert rec.checkpoints[-1][1]["state"]["rollbacks"] == 1  # a resume keeps counting
    assert [e for e, _ in rec.events].count("rollback") == 1


def test_fault_settings_give_their_hooks_and_metrics_log_sees_every_step_and_event(
    monkeypatch,
):
    import cfebm.loop as loop_module

    assert FaultInjection().hooks() == []  # the defaults: nothing injected, no pacing
    slept = []
    monkeypatch.setattr(loop_module.time, "sleep", slept.append)

    class Logged(MetricsLog):
        def __init__(self):
            self.rows = []

        def log(self, step, values):
            self.rows.append((step, values))

    trainer, logged = Trainer(tiny_cfg(images={4: 96}), pyramid()), Logged()
    faults = FaultInjection(inject_divergence_at_step=6, checkpoint_delay_s=0.25)
    summary = train_stage(trainer, LoopConfig(checkpoint_every=4), [logged, *faults.hooks()])
    assert summary.status == "completed" and summary.rollbacks == 1
    assert slept == [0.25] * 3  # after each checkpoint (steps 4, 8, 12)
    losses = [step for step, values in logged.rows if "loss" in values]
    # the NaN batch comes after step 6; the rollback to step 4's checkpoint replays 5 and 6
    assert losses == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]
    (rollback,) = [values for _, values in logged.rows if "rollbacks" in values]
    assert rollback["rollbacks"] == 1 and rollback["lr"] == pytest.approx(summary.lr)


def test_divergence_past_the_limit_stops_with_a_clear_error():
    trainer = Trainer(tiny_cfg(images={4: 96}), pyramid())
    rec = Record()
    loop = LoopConfig(checkpoint_every=4, max_rollbacks=2)
    summary = train_stage(trainer, loop, [rec, InjectDivergence(at_step=5, times=10)])
    assert summary.status == "diverged" and summary.rollbacks == 2
    assert "after 2 rollback(s)" in summary.error
    assert [n for n, _ in rec.checkpoints] == ["checkpoint-step0000004"]


def test_a_diverged_step_is_reported_and_not_applied_and_fit_raises():
    trainer = Trainer(tiny_cfg(), pyramid())
    fit(trainer, max_steps=1)
    with torch.no_grad():
        trainer.model.current.head.linear.bias.fill_(float("nan"))
    poisoned = params_of(trainer)
    result = trainer.step()
    assert result.diverged is not None and "nan" in result.diverged
    assert trainer.state.step == 1  # the step did not count
    after = params_of(trainer)
    for k in poisoned:
        torch.testing.assert_close(after[k], poisoned[k], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(DivergenceError, match="stage 0"):
        fit(trainer, max_steps=1)
    with pytest.raises(DivergenceError, match="exceeds the divergence threshold"):
        fit(Trainer(tiny_cfg(divergence_threshold=1e-6), pyramid()), max_steps=1)


def test_nan_weights_are_never_checkpointed():
    trainer = Trainer(tiny_cfg(images={4: 96}), pyramid())
    rec = Record()

    class Poison(Hooks):
        def after_step(self, t, r, seconds):
            if t.state.step == 3:
                with torch.no_grad():
                    next(t.model.current.parameters()).fill_(math.nan)

    summary = train_stage(trainer, LoopConfig(checkpoint_every=4, max_rollbacks=0), [rec, Poison()])
    assert summary.status == "diverged" and rec.checkpoints == []


def test_keep_best_keeps_the_lowest_score_and_the_model_file_holds_it():
    trainer = Trainer(tiny_cfg(images={4: 96}), pyramid())
    scores = iter([3.0, 1.0, 2.0, 5.0])

    class Score(Hooks):
        def evaluate(self, t):
            return {"score": next(scores)}

    loop = LoopConfig(checkpoint_every=100, evaluate_every=4, keep_best=True)
    train_stage(trainer, loop, [Score()])
    assert trainer.best["score"] == 1.0 and trainer.best["step"] == 8
    f = model_file(trainer.state_dict())
    model = model_from_checkpoint(f)
    best = {k: v for k, v in trainer.best["model"].items()}
    assert all(torch.equal(model.current.state_dict()[k], v) for k, v in best.items())
    assert f["best"]["score"] == 1.0 and "optimizer" not in f


def test_compute_limit_stops_the_stage():
    trainer = Trainer(tiny_cfg(images={4: 8000}), pyramid())
    fit(trainer, max_steps=1)
    per_step = trainer.state.flops
    summary = train_stage(trainer, LoopConfig(max_flops=5.5 * per_step))
    assert summary.status == "stopped" and trainer.state.step == 6


def test_replay_buffer_is_used_and_resumes_exactly(tmp_path):
    cfg = tiny_cfg(replay={4: 0.5}, replay_buffer=16, images={4: 80})
    data = pyramid()
    straight = Trainer(cfg, data)
    fit(straight, until_stage=0)
    first = Trainer(cfg, data)
    fit(first, max_steps=4)
    before = first.replay.clone()
    save_checkpoint(first.state_dict(), str(tmp_path / "c.pt"))
    resumed = Trainer.from_checkpoint(load_checkpoint(str(tmp_path / "c.pt")), data)
    assert torch.equal(resumed.replay, before)
    fit(resumed, until_stage=0)
    assert torch.equal(resumed.replay, straight.replay)
    assert all(
        torch.equal(a, b) for a, b in zip(params_of(resumed).values(), params_of(straight).values())
    )
    assert not torch.equal(straight.replay, Trainer(cfg, data).replay)  # it holds samples


def test_file_checkpoints_resume_only_the_same_run(tmp_path):
    url = str(tmp_path / "last.pt")
    trainer = Trainer(tiny_cfg(images={4: 96}), pyramid())
    train_stage(
        trainer,
        LoopConfig(checkpoint_every=4),
        [FileCheckpoints(url, "run-a", lambda _: None)],
        max_steps=5,
    )
    other = Trainer(tiny_cfg(images={4: 96}), pyramid())
    assert not resume_from_file(other, url, "run-b") and other.state.step == 0
    assert resume_from_file(other, url, "run-a") and other.state.step == 5


def test_worker_checkpoint_folders_are_exact_for_the_same_world_size(tmp_path):
    """Each rank gets back all of its own state, the bank of coarse chains included (each
    rank draws its own bank with its own noise)."""
    ranks = [Trainer(tiny_cfg(coarse_bank=16), pyramid(), world_size=2, rank=r) for r in (0, 1)]
    for t in ranks:
        fit(t, max_steps=4)  # stage 0 (4 steps), then one step of stage 1: the bank is drawn
        t.advance_stage()
        t.step()
        save_worker_checkpoint(str(tmp_path), t.state_dict(), t.rank, 2)
    assert not torch.equal(ranks[0].bank, ranks[1].bank)
    for t in ranks:
        ckpt, exact = load_worker_checkpoint(str(tmp_path), t.rank, 2)
        assert exact
        resumed = Trainer.from_checkpoint(ckpt, pyramid(), world_size=2, rank=t.rank)
        own, back = t.state_dict(), resumed.state_dict()
        assert torch.equal(back["bank"], own["bank"])
        assert all(torch.equal(back["rng"][k], own["rng"][k]) for k in ("data", "sample"))
        assert torch.equal(back["batches"]["perm"], own["batches"]["perm"])
    _, exact = load_worker_checkpoint(str(tmp_path), 2, 3)
    assert not exact  # another world size: the rank redraws its data order (Trainer.reshuffle)


def test_next_stage_model_grows_the_previous_one_identically_on_every_worker():
    trainer = Trainer(tiny_cfg(), pyramid())
    fit(trainer, until_stage=0)
    f = model_file(trainer.state_dict())
    a, b = next_stage_model(f, 1, seed=0), next_stage_model(f, 1, seed=0)
    assert a.stage == 1 and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )
    with pytest.raises(ValueError, match="stage-1 model"):
        next_stage_model(f, 2, seed=0)


def test_batches_split_evenly_over_workers_or_say_what_to_set():
    cfg = tiny_cfg(batch_size={4: 8, 8: 12})
    assert per_worker(cfg, 4).train.batch_size == {4: 2, 8: 3}
    with pytest.raises(ConfigError, match="multiple of 8"):
        per_worker(cfg, 8)


def test_checkpoint_errors_name_the_file_and_never_suggest_an_unsafe_load(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(str(tmp_path))
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": Fraction(1, 3)}, pickled)  # not tensors and plain data
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(pickled))
    assert "weights_only" not in str(e.value) and "unpickle" in str(e.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a cfebm checkpoint"):
        load_checkpoint(str(other))


def test_divergence_rules():
    assert divergence(0.1, -1.0, 1.0, 1000) is None
    assert "nan" in divergence(math.nan, 0.0, 0.0, 1000)
    assert "inf" in divergence(0.0, math.inf, 0.0, 1000)
    assert "energy(samples)" in divergence(0.0, 0.0, -2000.0, 1000)
    loss = contrastive_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0]), 0.5)
    assert loss.item() == pytest.approx(2.0 - 1.0 + 0.5 * (5.0 + 2.0))


def test_training_moves_samples_toward_the_data():
    # Data: flat images at +0.6 (uint8 204). Untrained samples average ~0; after a few
    # dozen contrastive steps the sampler must have learnt to push them up.
    x4 = torch.full((64, 1, 4, 4), 204.0)
    cfg = CFEBMConfig(
        model=ModelConfig(resolutions=(4,), base_width=8),
        sampler=SamplerConfig(steps=10, step_size=0.5, noise_start=0.005),
        train=TrainConfig(batch_size={4: 32}, lr={4: 5e-3}, images={4: 32 * 60}, seed=0),
    )
    trainer = Trainer(cfg, {4: x4})
    gen = torch.Generator().manual_seed(0)
    before = sample(trainer.model, 64, cfg.sampler, generator=gen).mean().item()
    fit(trainer)
    after = sample(trainer.model, 64, cfg.sampler, generator=gen).mean().item()
    assert after > before + 0.3, (before, after)


def test_source_initialised_chains_translate_toward_the_data():
    src, tgt = torch.full((64, 1, 4, 4), 40.0), torch.full((64, 1, 4, 4), 215.0)
    cfg = CFEBMConfig(
        model=ModelConfig(resolutions=(4,), base_width=8),
        sampler=SamplerConfig(steps=10, step_size=0.5, noise_start=0.005),
        train=TrainConfig(batch_size={4: 32}, lr={4: 5e-3}, images={4: 32 * 60}, seed=0),
    )
    trainer = Trainer(cfg, {4: tgt}, source={4: src})
    fit(trainer)
    x0 = src[:16] / 127.5 - 1
    out = sample(trainer.model, 16, cfg.sampler, x_init=x0, generator=torch.Generator())
    assert out.mean() > x0.mean() + 0.3
    assert trainer.state_dict()["source_batches"] is not None


def test_train_config_validation_and_lookup():
    t = TrainConfig(
        batch_size={8: 256, 32: 64},
        lr={4: 1e-3, 16: 5e-4},
        images={8: 100},
        fade_images=10,
        stable_images=20,
    )
    assert t.batch_for(16) == 256 and t.batch_for(64) == 64
    assert t.lr_for(8) == 1e-3 and t.lr_for(32) == 5e-4
    assert t.images_for(8) == 100 and t.images_for(16) == 30
    with pytest.raises(ConfigError, match="no entry at or below resolution 4"):
        t.batch_for(4)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr={4: -1.0})
    with pytest.raises(ConfigError, match="adam_betas"):
        TrainConfig(adam_betas=(0.5, 1.5))
    with pytest.raises(ConfigError, match="replay"):
        TrainConfig(replay={4: 1.5})


def test_missing_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="no training images at resolution 4"):
        Trainer(tiny_cfg(), {16: torch.zeros(4, 1, 16, 16)})


def test_chain_compute_counts_each_stages_own_steps():
    from cfebm.flops import energy_grad_flops
    from cfebm.frozen import FrozenEnergy

    def step_flops(sampler) -> tuple[float, Trainer]:
        cfg = replace(tiny_cfg(images={4: 8}), sampler=sampler)
        t = Trainer(cfg, pyramid())
        fit(t, max_steps=1)  # stage 0
        t.advance_stage()
        before = t.state.flops
        t.step()
        return t.state.flops - before, t

    uniform, t = step_flops(SamplerConfig(steps=4))
    fewer, _ = step_flops(SamplerConfig(steps=4, stage_steps=[4, 1]))
    c, n = t.cfg.model.channels, t.cfg.train.batch_for(8)
    g1 = energy_grad_flops(FrozenEnergy(t.model.current), (c, 8, 8))
    assert uniform - fewer == pytest.approx(3 * g1 * n)  # 3 fewer steps at 8x8 per image


def test_coarse_bank_is_drawn_once_per_stage_counted_and_resumes_exactly(tmp_path):
    cfg = tiny_cfg(images={4: 8}, coarse_bank=20)
    data = pyramid()
    t = Trainer(cfg, data)
    fit(t, max_steps=1)  # stage 0: no bank (nothing is finished yet)
    assert t.bank is None
    t.advance_stage()
    t.step()
    bank = t.bank
    assert bank.shape == (20, 1, 4, 4)  # the finished stage's chain output, at 4x4
    before = t.state.flops
    t.step()
    assert t.bank is bank  # drawn once for the stage
    g = t._grad_flops
    per_step = g[1] * cfg.sampler.k(1) * 8 + t._loss_flops * 2 * 8  # stage 1's steps only
    assert t.state.flops - before == pytest.approx(per_step)
    save_checkpoint(t.state_dict(), str(tmp_path / "c.pt"))
    fit(t, max_steps=3)
    resumed = Trainer.from_checkpoint(load_checkpoint(str(tmp_path / "c.pt")), data)
    assert torch.equal(resumed.bank, bank)
    fit(resumed, max_steps=3, resumed=True)
    a, b = params_of(t), params_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.state == t.state
    t.advance_stage()
    assert t.bank is None  # a new stage draws its own (at 8x8) on first use
    with pytest.raises(ConfigError, match="coarse_bank"):
        TrainConfig(coarse_bank=-1)
