"""The training step, the plain trainer, divergence handling and exact checkpoint resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import CFEBMConfig, ConfigError, ModelConfig, SamplerConfig, TrainConfig
from cfebm.objective import contrastive_loss, divergence
from cfebm.sampling import sample
from cfebm.trainer import DivergenceError, Trainer, model_from_checkpoint


def tiny_cfg(**train) -> CFEBMConfig:
    t = dict(batch_size={4: 8}, lr={4: 2e-3}, fade_images=32, stable_images=32, seed=3)
    t.update(train)
    return CFEBMConfig(
        model=ModelConfig(channels=1, resolutions=(4, 8, 16), base_width=4),
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


def test_n_plus_m_steps_equal_n_then_save_load_then_m(tmp_path):
    data = pyramid()
    # straight: 7 steps, crossing from stage 0 into the fade of stage 1
    straight = Trainer(tiny_cfg(), data)
    straight.fit(max_steps=7)
    # interrupted: 3 steps, checkpoint, a brand-new trainer loads it, 4 more steps
    first = Trainer(tiny_cfg(), data)
    first.fit(max_steps=3)
    url = str(tmp_path / "ckpt" / "last.pt")
    save_checkpoint(first.state_dict(), url)
    del first
    torch.manual_seed(999)  # a different process state must not matter
    resumed = Trainer.from_checkpoint(load_checkpoint(url), data)
    resumed.fit(max_steps=4)
    assert resumed.state == straight.state
    assert resumed.state.stage == 1 and 0 < resumed.beta < 1  # mid-fade, not restarted
    a, b = params_of(straight), params_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_in_memory_filesystem_url():
    trainer = Trainer(tiny_cfg(), pyramid())
    trainer.fit(max_steps=2)
    save_checkpoint(trainer.state_dict(), "memory://cfebm-test/ckpt.pt")
    ckpt = load_checkpoint("memory://cfebm-test/ckpt.pt")
    assert ckpt["state"]["step"] == 2
    model = model_from_checkpoint(ckpt)
    assert model.stage == trainer.model.stage and not model.training


def test_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a cfebm checkpoint"):
        load_checkpoint(str(other))


def test_fit_runs_every_stage_with_fade_then_stable():
    trainer = Trainer(tiny_cfg(), pyramid())
    betas = []
    trainer.fit(callback=lambda t, r: betas.append((t.state.stage, r.beta)))
    assert trainer.model.stage == 2
    assert [s for s, _ in betas] == [0] * 4 + [1] * 8 + [2] * 8
    stage1 = [b for s, b in betas if s == 1]
    assert stage1[:4] == [0.0, 0.25, 0.5, 0.75] and stage1[4:] == [1.0] * 4
    assert trainer.state.total_images == 20 * 8


def test_diverged_step_is_reported_and_not_applied():
    trainer = Trainer(tiny_cfg(), pyramid())
    trainer.fit(max_steps=1)
    before = params_of(trainer)
    with torch.no_grad():
        trainer.model.head.linear.bias.fill_(float("nan"))
    poisoned = params_of(trainer)
    result = trainer.step()
    assert result.diverged is not None and "nan" in result.diverged
    assert trainer.state.step == 1  # the step did not count
    after = params_of(trainer)
    for k in poisoned:  # nothing stepped: every parameter is exactly as before the step
        torch.testing.assert_close(after[k], poisoned[k], rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(after[k], before[k]) for k in before if "head.linear.bias" not in k)
    with pytest.raises(DivergenceError, match="stage 0"):
        trainer.fit(max_steps=1)


def test_energy_magnitude_over_threshold_is_divergence():
    trainer = Trainer(tiny_cfg(divergence_threshold=1e-6), pyramid())
    with pytest.raises(DivergenceError, match="exceeds the divergence threshold"):
        trainer.fit(max_steps=1)


def test_rollback_changes_course():
    data = pyramid()
    a = Trainer(tiny_cfg(), data)
    a.fit(max_steps=1)
    ckpt = a.state_dict()
    b = Trainer.from_checkpoint(ckpt, data)
    b.after_rollback(lr_factor=0.5, seed_offset=1)
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    a.fit(max_steps=1)
    b.fit(max_steps=1)
    assert not torch.equal(a.model.head.linear.weight, b.model.head.linear.weight)


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
        model=ModelConfig(channels=1, resolutions=(4,), base_width=8),
        sampler=SamplerConfig(steps=10, step_size=0.5, noise_start=0.005),
        train=TrainConfig(batch_size={4: 32}, lr={4: 5e-3}, stable_images=32 * 60, seed=0),
    )
    trainer = Trainer(cfg, {4: x4})
    gen = torch.Generator().manual_seed(0)
    before = sample(trainer.model, 64, cfg.sampler, generator=gen).mean().item()
    trainer.fit()
    after = sample(trainer.model, 64, cfg.sampler, generator=gen).mean().item()
    assert after > before + 0.3, (before, after)


def test_train_config_validation_and_lookup():
    t = TrainConfig(batch_size={8: 256, 32: 64}, lr={4: 1e-3, 16: 5e-4})
    assert t.batch_for(16) == 256 and t.batch_for(64) == 64
    assert t.lr_for(8) == 1e-3 and t.lr_for(32) == 5e-4
    with pytest.raises(ConfigError, match="no entry at or below resolution 4"):
        t.batch_for(4)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr={4: -1.0})
    with pytest.raises(ConfigError, match="adam_betas"):
        TrainConfig(adam_betas=(0.5, 1.5))
    assert TrainConfig().stage_images(0) == TrainConfig().stable_images


def test_missing_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="no training images at resolution 4"):
        Trainer(tiny_cfg(), {16: torch.zeros(4, 1, 16, 16)})


def test_source_initialised_chains_translate_toward_the_data():
    # Source domain: dark flat images; target domain: bright flat images. The chains of
    # a trained translator start at the source images and end nearer the target.
    src = torch.full((64, 1, 4, 4), 40.0)
    tgt = torch.full((64, 1, 4, 4), 215.0)
    cfg = CFEBMConfig(
        model=ModelConfig(channels=1, resolutions=(4,), base_width=8),
        sampler=SamplerConfig(steps=10, step_size=0.5, noise_start=0.005),
        train=TrainConfig(batch_size={4: 32}, lr={4: 5e-3}, stable_images=32 * 60, seed=0),
    )
    trainer = Trainer(cfg, {4: tgt}, source={4: src})
    trainer.fit()
    x0 = src[:16] / 127.5 - 1
    out = sample(trainer.model, 16, cfg.sampler, x_init=x0, generator=torch.Generator())
    assert out.mean() > x0.mean() + 0.3
    assert trainer.state_dict()["source_batches"] is not None
