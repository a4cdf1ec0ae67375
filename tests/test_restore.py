"""Restoration (cfebm.restore): corruptions, PSNR/SSIM against reference values, and
denoising / inpainting with the trained smoke model of digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfebm.config import ConfigError
from cfebm.data import PyramidStore, to_unit_range
from cfebm.frozen import stage_energies
from cfebm.langevin import energy_and_grad
from cfebm.restore import (
    MASK_KINDS,
    ChainConfig,
    FidelityEnergy,
    RestoreConfig,
    apply_mask,
    centre_square_mask,
    denoise,
    evaluate_restoration,
    gaussian_noise,
    gaussian_window,
    inpaint,
    make_mask,
    mask_pyramid,
    psnr,
    random_boxes_mask,
    random_pixel_mask,
    ssim,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits_test(digits_data) -> torch.Tensor:
    return to_unit_range(PyramidStore(digits_data).read("test", 8))[:256]


# --- quality measures ----------------------------------------------------------------------


def test_psnr_reference_values():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.2  # MSE 0.04 at data range 2: 10 log10(4 / 0.04) = 20 dB
    y[1, :, :2] += 0.2  # half the pixels: MSE 0.02 -> 23.01 dB
    assert torch.allclose(
        psnr(y, x), torch.tensor([20.0, 10 * math.log10(200)], dtype=torch.float64)
    )
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True  # only the changed half of image 1
    assert psnr(y, x, mask=mask)[1].item() == pytest.approx(20.0)
    u8 = torch.full((1, 1, 4, 4), 100, dtype=torch.uint8)
    assert psnr(u8, u8 + 10).item() == pytest.approx(10 * math.log10(255**2 / 100))
    assert math.isinf(psnr(x, x)[0].item())


def ssim_reference(x: np.ndarray, y: np.ndarray, L: float, size: int, sigma: float) -> float:
    """SSIM by explicit loops over every valid window position (Wang et al. 2004), of
    intensities in [0, L]."""
    w = gaussian_window(size, sigma).numpy()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[c, i : i + size, j : j + size], y[c, i : i + size, j : j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                cov = (w * a * b).sum() - ma * mb
                num = (2 * ma * mb + c1) * (2 * cov + c2)
                values.append(num / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_explicit_loops_per_image():
    x = torch.rand(3, 2, 10, 9, generator=gen(1)) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen(2))).clamp(-1, 1)
    got = ssim(x, y, window_size=7)
    for n in range(3):
        a, b = (v[n].double().numpy() + 1 for v in (x, y))  # [-1, 1] -> [0, 2]
        want = ssim_reference(a, b, 2.0, 7, 1.5)
        assert got[n].item() == pytest.approx(want, rel=1e-9)


def test_ssim_identity_constant_and_monotone_in_noise():
    x = torch.rand(4, 3, 16, 16, generator=gen(3)) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    # Constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1) of the
    # intensities a, b in [0, 2].
    a, b = torch.full((1, 1, 8, 8), 0.5), torch.full((1, 1, 8, 8), -0.25)
    c1 = (0.01 * 2) ** 2
    want = (2 * 1.5 * 0.75 + c1) / (1.5**2 + 0.75**2 + c1)
    assert ssim(a, b).item() == pytest.approx(want)
    scores = [ssim(x, gaussian_noise(x, s, gen(4))).mean().item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(p > q for p, q in zip(scores, scores[1:])), scores
    assert ssim(x, x.flip(0)).mean() < 0.2  # other images
    y = gaussian_noise(x, 0.2, gen(5))
    assert torch.allclose(ssim(x, y), ssim(y, x))


def test_ssim_uint8_uses_data_range_255():
    x = torch.randint(0, 256, (2, 1, 8, 8), generator=gen(6), dtype=torch.uint8)
    y = (x.int() + torch.randint(-20, 21, x.shape, generator=gen(7))).clamp(0, 255).to(torch.uint8)
    assert torch.allclose(ssim(x, y), ssim(x.double(), y.double(), value_range=(0, 255)))
    # The same images in [-1, 1] score the same: SSIM is taken on intensities from 0.
    as_unit = ssim(x.double() / 127.5 - 1, y.double() / 127.5 - 1)
    assert torch.allclose(ssim(x, y), as_unit)
    assert torch.allclose(psnr(x, y), psnr(x.double() / 127.5 - 1, y.double() / 127.5 - 1))


def test_ssim_matches_scikit_image_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    x = torch.rand(1, 1, 16, 16, generator=gen(8)) * 2 - 1
    y = gaussian_noise(x, 0.2, gen(9))
    want = metrics.structural_similarity(
        x[0, 0].double().numpy() + 1,
        y[0, 0].double().numpy() + 1,
        data_range=2.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(x, y).item() == pytest.approx(want, abs=1e-6)


# --- corruptions ---------------------------------------------------------------------------


def test_masks_have_the_asked_size_and_are_deterministic_by_generator():
    centre = centre_square_mask(2, 16, 0.25)
    assert centre.shape == (2, 1, 16, 16) and centre.dtype == torch.bool
    assert centre[0, 0, 4:12, 4:12].all() and centre.sum() == 2 * 64
    pixels = random_pixel_mask(5, 8, 0.25, gen(1))
    assert (pixels.flatten(1).sum(1) == 16).all()  # exactly 25% of every image
    assert torch.equal(pixels, random_pixel_mask(5, 8, 0.25, gen(1)))
    assert not torch.equal(pixels, random_pixel_mask(5, 8, 0.25, gen(2)))
    boxes = random_boxes_mask(50, 16, num_boxes=2, box_fraction=0.25, generator=gen(3))
    per_image = boxes.flatten(1).sum(1)
    assert (per_image >= 16).all() and (per_image <= 32).all()  # two 4x4 boxes, maybe overlapping
    assert torch.equal(boxes, random_boxes_mask(50, 16, 2, 0.25, gen(3)))
    with pytest.raises(ConfigError):
        make_mask("triangle", 1, 8)


def test_apply_mask_changes_only_missing_pixels():
    x = torch.rand(3, 1, 8, 8, generator=gen(0)) * 2 - 1
    mask = random_pixel_mask(3, 8, 0.5, gen(1))
    for fill in ("noise", "zero", "mean"):
        c = apply_mask(x, mask, fill, gen(2))
        assert torch.equal(c[~mask], x[~mask])
    mean = apply_mask(x, mask, "mean")
    known = x[0, 0][~mask[0, 0]]
    assert torch.allclose(mean[0, 0][mask[0, 0]], known.mean().expand(32))


def test_coarse_pixel_is_known_only_when_all_children_are():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0, 0] = True  # one missing child in the top-left 2x2 block
    coarse, fine = mask_pyramid(mask, 2)
    assert torch.equal(fine, mask)
    assert coarse.shape == (1, 1, 2, 2) and coarse.sum() == 1 and coarse[0, 0, 0, 0]


def test_fidelity_energy_adds_the_gaussian_likelihood_gradient():
    y = torch.rand(2, 1, 4, 4, generator=gen(0))
    x = torch.rand(2, 1, 4, 4, generator=gen(1))
    e, g = energy_and_grad(FidelityEnergy(lambda z: (z**2).flatten(1).sum(1), y, 3.0), x)
    assert torch.allclose(g, 2 * x + 3.0 * (x - y))


def test_restore_config_from_params_dict_and_errors():
    cfg = RestoreConfig.from_dict({"masks": ["centre"], "denoise_chain": {"steps": 3}})
    assert cfg.masks == ("centre",) and cfg.denoise_chain.steps == 3
    assert cfg.denoise_chain.step_size == RestoreConfig().denoise_chain.step_size
    for bad in ({"masks": ["star"]}, {"fill": "grey"}, {"nope": 1}, {"inpaint_chain": {"k": 1}}):
        with pytest.raises(ConfigError):
            RestoreConfig.from_dict(bad)


# --- with the trained smoke model ----------------------------------------------------------


def test_denoising_improves_psnr_and_depends_on_the_energy(digits_model, digits_test):
    model, x = digits_model.model, digits_test
    noisy = gaussian_noise(x, 0.5, gen(1))
    chain = RestoreConfig().denoise_chain

    def restored_psnr(energies) -> float:
        out = denoise(energies, noisy, chain, noise_sigma=0.5, fidelity=0.1, generator=gen(2))
        return psnr(out, x).mean().item()

    before = psnr(noisy, x).mean().item()
    energies = stage_energies(model)
    after = restored_psnr(energies)
    assert after > before + 0.5, (before, after)
    # The gain comes from the energy: with it reversed, the same chain makes things worse.
    reversed_ = [lambda z, e=e: -e(z) for e in energies]
    assert restored_psnr(reversed_) < before


def test_inpainting_never_changes_known_pixels(digits_model, digits_test):
    x = digits_test[:64]
    for kind in MASK_KINDS:
        mask = make_mask(kind, len(x), 8, generator=gen(3))
        corrupted = apply_mask(x, mask, "noise", gen(4))
        for c2f in (True, False):
            out = inpaint(
                digits_model.model, corrupted, mask, ChainConfig(steps=5), coarse_to_fine=c2f
            )
            assert torch.equal(out[~mask.expand_as(out)], x[~mask.expand_as(x)]), (kind, c2f)
            assert not torch.equal(out[mask.expand_as(out)], corrupted[mask.expand_as(out)])


def test_inpainting_improves_psnr_on_the_missing_pixels(digits_model, digits_test):
    results = evaluate_restoration(digits_model.model, digits_test, RestoreConfig(seed=1))
    assert set(results) == {"denoise", *(f"inpaint_{k}" for k in MASK_KINDS)}
    for kind in MASK_KINDS:
        m = results[f"inpaint_{kind}"].metrics
        assert m["psnr_masked_restored"] > m["psnr_masked_corrupted"] + 1.0, (kind, m)
        assert m["psnr_restored"] > m["psnr_corrupted"], (kind, m)


def test_restoration_is_deterministic_given_the_seed(digits_model, digits_test):
    cfg = RestoreConfig(masks=("pixels",), seed=3)
    a = evaluate_restoration(digits_model.model, digits_test[:32], cfg)
    b = evaluate_restoration(digits_model.model, digits_test[:32], cfg)
    for task in a:
        assert torch.equal(a[task].restored, b[task].restored)
        assert a[task].metrics == b[task].metrics
