"""Out-of-distribution detection (cfebm.ood): AUROC orientation and reference values, the
OOD sets, energy scores, plots, and detection with the trained smoke model of digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfebm.config import ConfigError
from cfebm.data import PyramidStore, to_unit_range
from cfebm.ood import (
    MEAN,
    OODConfig,
    auroc,
    auroc_report,
    builtin_sets,
    constant_set,
    energy_histogram_png,
    energy_scores,
    interpolation_set,
    match_images,
    roc_curve,
    roc_plot_png,
    uniform_noise_set,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG\r\n\x1a\n"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_auroc_orientation_higher_energy_is_ood():
    e_in = torch.tensor([-3.0, -2.0, -1.0])
    assert auroc(e_in, torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(e_in, torch.tensor([-5.0, -4.0])) == 0.0
    assert auroc(e_in, e_in.clone()) == 0.5  # ties count half


def test_auroc_is_the_mann_whitney_probability():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200), rng.normal(0.7, 1, 150)
    pairs = (b[:, None] > a[None, :]).mean() + 0.5 * (b[:, None] == a[None, :]).mean()
    assert auroc(a, b) == pytest.approx(pairs)
    fpr, tpr = roc_curve(a, b)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.trapezoid(tpr, fpr) == pytest.approx(pairs)
    report = auroc_report(torch.from_numpy(a), {"x": torch.from_numpy(b), "y": torch.from_numpy(a)})
    assert report[MEAN] == pytest.approx((pairs + 0.5) / 2)
    with pytest.raises(ValueError, match="NaN"):
        auroc(a, np.array([np.nan]))


def test_builtin_sets_have_the_data_shape_and_are_deterministic():
    images = torch.rand(20, 3, 8, 8, generator=gen(0)) * 2 - 1
    cfg = OODConfig(num_images=12, seed=4)
    sets = builtin_sets(images, cfg)
    assert list(sets) == ["uniform", "constant", "interpolation"]
    for x in sets.values():
        assert x.shape == (12, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    again = builtin_sets(images, cfg)
    assert all(torch.equal(sets[k], again[k]) for k in sets)
    c = sets["constant"]
    assert torch.equal(c, c[:, :, :1, :1].expand_as(c))  # one colour per image
    assert c[:, :, 0, 0].std(0).min() > 0.2  # different colours
    u = uniform_noise_set(500, 1, 8, gen(1))
    assert abs(u.mean()) < 0.02 and u.std().item() == pytest.approx(2 / 12**0.5, rel=0.02)
    assert constant_set(3, 1, 4, gen(2)).unique().numel() == 3


def test_interpolations_mix_two_different_images():
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 4, 4) / 5  # image i is i / 5
    mixed = interpolation_set(images, 200, alpha=0.25, generator=gen(3))
    values = mixed[:, 0, 0, 0] * 5  # 0.25 i + 0.75 j
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    allowed = torch.tensor([0.25 * i + 0.75 * j for i, j in pairs])
    assert all((allowed - v).abs().min() < 1e-5 for v in values)
    assert torch.equal(mixed, mixed[:, :, :1, :1].expand_as(mixed))
    with pytest.raises(ValueError):
        interpolation_set(images[:1], 3)


def test_match_images_converts_channels_and_size():
    rgb = torch.rand(2, 3, 16, 16, generator=gen(4)) * 2 - 1
    grey = match_images(rgb, 1, 8)
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert grey.shape == (2, 1, 8, 8)
    assert torch.allclose(grey, torch.nn.functional.avg_pool2d(luma, 2), atol=1e-6)
    up = match_images(grey, 3, 16)
    assert up.shape == (2, 3, 16, 16) and torch.equal(up[:, 0], up[:, 2])


def test_ood_config_validates():
    for bad in ({"sets": ["svhn"]}, {"num_images": 1}, {"other": {"uniform": "x"}}):
        with pytest.raises(ConfigError):
            OODConfig(**bad)


def test_plots_are_png():
    a, b = torch.randn(50).double(), torch.randn(40).double() + 1
    for data in (roc_plot_png(a, {"b": b}), energy_histogram_png(a, {"b": b})):
        assert data.startswith(PNG) and len(data) > 2000


# --- with the trained smoke model ----------------------------------------------------------


@pytest.fixture(scope="module")
def digits_test(digits_data) -> torch.Tensor:
    return to_unit_range(PyramidStore(digits_data).read("test", 8))


def test_energy_scores_do_not_depend_on_the_batch_size(digits_model, digits_test):
    a = energy_scores(digits_model.model, digits_test, batch_size=7)
    b = energy_scores(digits_model.model, digits_test, batch_size=1000)
    assert a.shape == (len(digits_test),) and torch.allclose(a, b, atol=1e-5)


def test_smoke_model_tells_noise_and_other_data_from_digits(digits_model, digits_test, shapes_data):
    cfg = OODConfig(num_images=300, seed=1)
    sets = builtin_sets(digits_test, cfg)
    shapes = to_unit_range(PyramidStore(shapes_data["a"]).read("test", 8))
    sets["shapes"] = match_images(shapes, 1, 8)
    e_in = energy_scores(digits_model.model, digits_test)
    report = auroc_report(e_in, {k: energy_scores(digits_model.model, v) for k, v in sets.items()})
    assert report["uniform"] > 0.95, report
    assert report["constant"] > 0.9, report
    assert report["shapes"] > 0.9, report
    # Interpolations (blends of real digits) are the hard set: the lowest AUROC of all.
    others = min(report[k] for k in ("uniform", "constant", "shapes"))
    assert report["interpolation"] < others, report
