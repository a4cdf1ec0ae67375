"""Restoration (cfebm.restore): corruptions, PSNR/SSIM against reference values, and
denoising / inpainting with the trained smoke model of digits."""

from __future__ import annotations

import math

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
        psnr(y, x).double(), torch.tensor([20.0, 10 * math.log10(200)], dtype=torch.float64)
    )
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True  # only the changed half of image 1
    assert psnr(y, x, mask=mask)[1].item() == pytest.approx(20.0)
    assert math.isinf(psnr(x, x)[0].item())


def test_ssim_identity_constant_and_monotone_in_noise():
    x = torch.rand(4, 3, 16, 16, generator=gen(3)) * 2 - 1
    assert torch.allclose(ssim(x, x).double(), torch.ones(4, dtype=torch.float64))
    # Constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1) of the
    # intensities a, b in [0, 1].
    a, b = torch.full((1, 1, 8, 8), 0.5), torch.full((1, 1, 8, 8), -0.25)
    c1 = 0.01**2
    want = (2 * 0.75 * 0.375 + c1) / (0.75**2 + 0.375**2 + c1)
    assert ssim(a, b).item() == pytest.approx(want, rel=1e-6)
    scores = [ssim(x, gaussian_noise(x, s, gen(4))).mean().item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(p > q for p, q in zip(scores, scores[1:])), scores
    assert ssim(x, x.flip(0)).mean() < 0.2  # other images
    y = gaussian_noise(x, 0.2, gen(5))
    assert torch.allclose(ssim(x, y), ssim(y, x))
    assert ssim(x[:, :, :4, :4], y[:, :, :4, :4]).shape == (4,)  # small images: a smaller window


def test_ssim_agrees_with_scikit_image():
    """torchmetrics against scikit-image's reference implementation (Gaussian weights,
    sigma 1.5, population covariance); they differ only at the borders, which a 64x64
    image makes small."""
    from skimage.metrics import structural_similarity

    x = torch.rand(2, 1, 64, 64, generator=gen(8)) * 2 - 1
    y = gaussian_noise(x, 0.2, gen(9))
    got = ssim(x, y)
    for n in range(2):
        want = structural_similarity(
            (x[n, 0].double().numpy() + 1) / 2,
            (y[n, 0].double().numpy() + 1) / 2,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert got[n].item() == pytest.approx(want, abs=5e-3)


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


def test_restore_config_errors_name_the_option():
    for bad, match in (
        ({"masks": ["star"]}, "masks"),
        ({"fill": "grey"}, "fill"),
        ({"mode": "magic"}, "mode"),
    ):
        with pytest.raises(ConfigError, match=match):
            RestoreConfig(**bad)


# --- with the trained smoke model ----------------------------------------------------------


def test_denoising_improves_psnr_and_depends_on_the_energy(digits_model, digits_test):
    model, x = digits_model.model, digits_test
    noisy = gaussian_noise(x, 0.5, gen(1))
    chain = RestoreConfig().denoise_chain

    def restored_psnr(energies) -> float:
        out = denoise(
            energies,
            noisy,
            chain,
            mode="posterior",
            noise_sigma=0.5,
            fidelity=0.1,
            generator=gen(2),
        )
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
        for mode in ("prior", "posterior"):
            out = inpaint(digits_model.model, corrupted, mask, ChainConfig(steps=5), mode=mode)
            assert torch.equal(out[~mask.expand_as(out)], x[~mask.expand_as(x)]), (kind, mode)
            assert not torch.equal(out[mask.expand_as(out)], corrupted[mask.expand_as(out)])


def test_prior_mode_is_the_finest_stage_alone_from_the_corrupted_image(digits_model, digits_test):
    """The paper's restoration: Langevin on the finest stage's energy from the corrupted
    image, no coarser stage involved (a chain callback sees one stage at 8x8)."""
    x = digits_test[:16]
    seen = []
    noisy = gaussian_noise(x, 0.3, gen(1))
    denoise(
        digits_model.model,
        noisy,
        ChainConfig(steps=4),
        mode="prior",
        callback=lambda d: seen.append((d["stage"], d["x"].shape[-1])),
    )
    assert seen == [(0, 8)] * 4
    seen.clear()
    denoise(
        digits_model.model,
        noisy,
        ChainConfig(steps=4),
        mode="posterior",
        noise_sigma=0.3,
        fidelity=0.1,
        callback=lambda d: seen.append((d["stage"], d["x"].shape[-1])),
    )
    assert seen == [(0, 4)] * 4 + [(1, 8)] * 4


@pytest.mark.parametrize("mode, kinds", [("prior", ["pixels"]), ("posterior", list(MASK_KINDS))])
def test_inpainting_improves_psnr_on_the_missing_pixels(digits_model, digits_test, mode, kinds):
    """The paper's mask (25% of the pixels) in its mode; every mask coarse to fine (a large
    hole filled with noise is too far from a digit for 10 small steps at the finest stage)."""
    cfg = RestoreConfig(seed=1, mode=mode)
    results = evaluate_restoration(digits_model.model, digits_test, cfg)
    assert set(results) == {"denoise", *(f"inpaint_{k}" for k in MASK_KINDS)}
    for kind in kinds:
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
