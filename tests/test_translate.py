"""One-sided translation and generative saliency (cfebm.translate): content measures on
known images, saliency on a chain with a known answer, and the smoke translator shapes
a (red-ish objects) -> b (blue-ish)."""

from __future__ import annotations

import pytest
import torch

from cfebm.data import PyramidStore, to_unit_range
from cfebm.langevin import sample_langevin
from cfebm.translate import (
    SaliencyAccumulator,
    colour_distance,
    foreground_mask,
    heatmap,
    mask_iou,
    normalise_maps,
    saliency_overlay,
    structure_ssim,
    translate,
    translate_with_saliency,
    translation_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scene(colour, background=(0.1, 0.1, 0.1), box=(2, 6, 3, 7), size=8) -> torch.Tensor:
    """One RGB image [1, 3, r, r] in [-1, 1]: a flat box of ``colour`` on a flat background."""
    x = torch.tensor(background).view(1, 3, 1, 1).repeat(1, 1, size, size)
    y0, y1, x0, x1 = box
    x[..., y0:y1, x0:x1] = torch.tensor(colour).view(1, 3, 1, 1)
    return x


# --- content and colour measures -----------------------------------------------------------


def test_foreground_mask_finds_the_object_whatever_its_hue():
    red, blue = scene((0.9, -0.8, -0.8)), scene((-0.8, -0.5, 0.9))
    want = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    want[..., 2:6, 3:7] = True
    assert torch.equal(foreground_mask(red), want) and torch.equal(foreground_mask(blue), want)
    shifted = (red + torch.tensor([0.0, 0.0, 0.3]).view(1, 3, 1, 1)).clamp(-1, 1)
    assert torch.equal(foreground_mask(shifted), want)  # a global colour cast changes nothing
    assert not foreground_mask(torch.zeros(1, 3, 8, 8)).any()  # a flat image has no object
    moved = scene((0.9, -0.8, -0.8), box=(0, 3, 0, 3))
    assert mask_iou(foreground_mask(red), foreground_mask(moved)).item() == 0.0
    assert mask_iou(want, want).item() == 1.0


def test_translation_scores_separate_content_from_colour():
    red = torch.cat([scene((0.9, -0.8, -0.8), box=b) for b in ((0, 4, 0, 4), (4, 8, 4, 8))])
    blue = torch.cat([scene((-0.8, -0.5, 0.9), box=b) for b in ((0, 4, 0, 4), (4, 8, 4, 8))])
    kept = translation_scores(red, blue, blue)  # recoloured in place: content kept
    assert kept.mask_iou == 1.0 and kept.colour_distance_translation == pytest.approx(0.0)
    assert kept.colour_distance_source > 0.5 and kept.foreground_distance_source > 2.0
    assert kept.foreground_distance_translation == pytest.approx(0.0, abs=1e-6)
    swapped = translation_scores(red, blue.flip(0), blue)  # right colour, wrong place
    assert swapped.mask_iou == 0.0 and swapped.structure_ssim < kept.structure_ssim
    assert colour_distance(red, red) == 0.0
    assert structure_ssim(red, red).tolist() == pytest.approx([1.0, 1.0])


# --- saliency ------------------------------------------------------------------------------


def test_saliency_is_zero_where_the_chain_cannot_change_the_image():
    # E(x) = 1/2 ||m * (x - t)||^2 moves only the pixels in m; the chain is noise-free.
    m = torch.zeros(1, 1, 8, 8)
    m[..., 1:4, 2:7] = 1.0
    t = torch.full((1, 1, 8, 8), 0.8)

    def energy(x):
        return 0.5 * (m * (x - t)).square().flatten(1).sum(1)

    x0 = torch.rand(3, 1, 8, 8, generator=gen(1)) * 2 - 1
    acc = SaliencyAccumulator(x0)
    x1 = sample_langevin(energy, x0, [0.3] * 6, [0.0] * 6, callback=acc)
    maps = acc.maps()
    for name in ("change", "gradient"):
        assert maps[name].shape == (3, 1, 8, 8)
        assert (maps[name][m.expand(3, 1, 8, 8) == 0] == 0).all(), name
        assert maps[name].amax((1, 2, 3)).tolist() == pytest.approx([1.0] * 3)
    # Without noise or clamping, the accumulated change of a monotone chain is |x1 - x0|.
    assert torch.allclose(acc.change.float(), (x1 - x0).abs(), atol=1e-6)


def test_saliency_follows_a_coarse_to_fine_chain_to_the_final_resolution():
    x0 = torch.zeros(2, 3, 4, 4)
    acc = SaliencyAccumulator(x0)
    acc({"k": 0, "x": x0 + 0.5, "grad": torch.ones_like(x0), "stage": 0})
    acc({"k": -1, "stage": 0, "x": x0 + 0.5})
    x8 = torch.full((2, 3, 8, 8), 0.5)
    x8[..., 0, 0] = 1.0
    acc({"k": 0, "x": x8, "grad": torch.zeros_like(x8), "stage": 1})
    assert acc.change.shape == (2, 1, 8, 8)
    assert acc.change[0, 0, 0, 0].item() == pytest.approx(3 * 0.5 + 3 * 0.5)
    assert acc.change[0, 0, 7, 7].item() == pytest.approx(1.5)


def test_heatmap_and_overlay_ranges():
    maps = normalise_maps(torch.rand(2, 1, 8, 8, generator=gen(2)))
    assert maps.min() == 0 and maps.max() == 1
    h = heatmap(maps)
    assert h.shape == (2, 3, 8, 8) and h.min() >= 0 and h.max() <= 1
    assert torch.equal(heatmap(torch.ones(1, 1, 1, 1)).flatten(), torch.ones(3))  # white hot
    over = saliency_overlay(torch.zeros(2, 1, 8, 8), maps)
    assert over.shape == (2, 3, 8, 8) and over.min() >= -1 and over.max() <= 1


# --- the smoke translator, shapes a -> b ---------------------------------------------------


@pytest.fixture(scope="module")
def held_out(shapes_data):
    a = to_unit_range(PyramidStore(shapes_data["a"]).read("test", 8))
    b = to_unit_range(PyramidStore(shapes_data["b"]).read("test", 8))
    return a, b


@pytest.fixture(scope="module")
def translated(shapes_translator, held_out):
    source, _ = held_out
    model, cfg = shapes_translator.model, shapes_translator.cfg
    return translate_with_saliency(model, source, cfg.sampler, generator=gen(3))


def test_translation_keeps_the_content_and_moves_colour_to_the_target(held_out, translated):
    source, target = held_out
    y, _ = translated
    assert y.shape == source.shape and y.min() >= -1 and y.max() <= 1
    s = translation_scores(source, y, target)
    # Style: colour statistics move most of the way to the target domain's, overall and on
    # the objects.
    assert s.colour_distance_translation < 0.5 * s.colour_distance_source, s
    assert s.foreground_distance_translation < 0.6 * s.foreground_distance_source, s
    # Content: each translation keeps its own source's layout and object, far above what an
    # unrelated image of the target domain shares with it.
    other = translation_scores(source, y.roll(1, 0), target)
    assert s.structure_ssim > 0.5 and s.structure_ssim > other.structure_ssim + 0.3, (s, other)
    assert s.mask_iou > 0.45 and s.mask_iou > other.mask_iou + 0.2, (s, other)


def per_image_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of two maps [N, 1, H, W]."""
    r = [torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1] for u, v in zip(a, b)]
    return torch.stack(r).nanmean().item()


def test_saliency_maps_concentrate_where_the_chain_changed_the_image(held_out, translated):
    source, _ = held_out
    y, maps = translated
    changed = (y - source).abs().sum(1, keepdim=True)  # [N, 1, H, W]
    top_quarter = changed.flatten(1) >= changed.flatten(1).quantile(0.75, 1, keepdim=True)
    for name in ("change", "gradient"):
        m = maps[name]
        assert m.shape == (len(source), 1, 8, 8) and m.min() >= 0 and m.max() <= 1
        own, other = per_image_corr(m, changed), per_image_corr(m, changed.roll(1, 0))
        assert own > 0.9 and own > other + 0.03, (name, own, other)
        # Most of each map's mass lies on the quarter of pixels that changed most.
        mass = ((m.flatten(1) * top_quarter).sum(1) / m.flatten(1).sum(1)).mean()
        assert mass > 0.45, (name, mass)


def test_translate_starts_at_a_coarser_stage_and_checks_sizes(shapes_translator, held_out):
    source, _ = held_out
    model, cfg = shapes_translator.model, shapes_translator.cfg
    y = translate(model, source[:4], cfg.sampler, start_stage=0, generator=gen(4))
    assert y.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="8x8"):
        translate(model, source[:4, :, :4, :4], cfg.sampler)
    a = translate(model, source[:4], cfg.sampler, generator=gen(5))
    b = translate(model, source[:4], cfg.sampler, generator=gen(5))
    assert torch.equal(a, b)
