"""Restoration with a trained energy: denoising and inpainting by short-run Langevin
(the paper's restoration experiments; docs/method.md, "Uses of the trained energy").

Images are float tensors [N, C, H, W] in [-1, 1]. A corruption is a pure function of the
clean images and a ``torch.Generator``; a mask is bool [N, 1, H, W] with True where a
pixel is *missing*, which is also the pixel that Langevin moves (``sample_langevin``'s
``mask``), so known pixels are reset after every step and never change.

Two modes (:data:`MODES`):

``prior`` (the paper's)
    Langevin on the prior energy of the restored stage alone, started from the corrupted
    image itself at that stage's resolution (the finest by default): K steps of
    x <- x - eta dE_s/dx + noise. Inpainting moves only the missing pixels.
``posterior``
    Coarse to fine through every stage's energy, started from the corrupted image's mean
    pooled pyramid, the way the model samples. Denoising adds the Gaussian likelihood of
    the noisy image at every level (weight ``fidelity``), so the chain is Langevin on the
    posterior p(x | y) rather than the prior; inpainting resets the known pixels after each
    upsampling and each step.

A short-run EBM's chain is tuned for synthesis from noise: run longer or with larger steps
from an image, it drifts away from it. So :class:`ChainConfig` is separate from the
training sampler, with fewer and smaller steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .config import ConfigError
from .frozen import FrozenEnergy, stage_energies
from .langevin import Callback, Energy, sample_langevin, upsample2x
from .model import CoarseToFineEBM
from .schedules import get_noise_scales_linear, get_step_sizes_constant

MODES = ("prior", "posterior")
MASK_KINDS = ("centre", "pixels", "boxes")
FILLS = ("noise", "zero", "mean")


@dataclass
class ChainConfig:
    """Langevin for restoration, x <- x - eta dE/dx + sigma_k N(0, I), K steps per stage."""

    steps: int = 10
    """Langevin steps per stage (K)."""
    step_size: float = 0.3
    """eta."""
    noise_start: float = 0.005
    """sigma_k decays linearly from noise_start to noise_end over each stage's steps."""
    noise_end: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"chain steps must be an integer >= 1, got {self.steps!r}")
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ConfigError(f"chain step_size must be positive, got {self.step_size!r}")
        if self.noise_start < 0 or self.noise_end < 0:
            raise ConfigError("chain noise scales must be >= 0")

    def schedules(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step sizes [K], noise scales [K]) for :func:`cfebm.langevin.sample_langevin`."""
        return (
            get_step_sizes_constant(self.steps, self.step_size),
            get_noise_scales_linear(self.steps, self.noise_start, self.noise_end),
        )


# --- corruptions ---------------------------------------------------------------------------


def gaussian_noise(
    x: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x + sigma * N(0, I), clamped to [-1, 1]; ``sigma`` is in the [-1, 1] scale
    (sigma = 0.2 is about 25 grey levels of 255)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + sigma * noise).clamp(-1.0, 1.0)


def centre_square_mask(n: int, size: int, fraction: float = 0.25, device=None) -> torch.Tensor:
    """Missing centre square covering about ``fraction`` of the image area: bool [n, 1, r, r]."""
    _check_fraction(fraction)
    side = max(1, min(size, round(size * math.sqrt(fraction))))
    lo = (size - side) // 2
    mask = torch.zeros((n, 1, size, size), dtype=torch.bool, device=device)
    mask[..., lo : lo + side, lo : lo + side] = True
    return mask


def random_pixel_mask(
    n: int, size: int, fraction: float = 0.25, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exactly ``round(fraction * r * r)`` missing pixels per image, chosen uniformly:
    bool [n, 1, r, r] (the paper's inpainting masks 25% of each image)."""
    _check_fraction(fraction)
    k = round(fraction * size * size)
    order = torch.rand((n, size * size), generator=generator).argsort(dim=1)
    mask = torch.zeros((n, size * size), dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.view(n, 1, size, size)


def random_boxes_mask(
    n: int,
    size: int,
    num_boxes: int = 3,
    box_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Union of ``num_boxes`` missing squares of side ``box_fraction * r`` at uniformly random
    positions: bool [n, 1, r, r]."""
    _check_fraction(box_fraction)
    if num_boxes < 1:
        raise ConfigError(f"num_boxes must be >= 1, got {num_boxes}")
    side = max(1, round(box_fraction * size))
    corners = torch.randint(0, size - side + 1, (n, num_boxes, 2), generator=generator)
    idx = torch.arange(size)
    mask = torch.zeros((n, 1, size, size), dtype=torch.bool)
    for b in range(num_boxes):
        y0, x0 = corners[:, b, 0].view(n, 1), corners[:, b, 1].view(n, 1)
        rows = (idx >= y0) & (idx < y0 + side)  # [n, r]
        cols = (idx >= x0) & (idx < x0 + side)
        mask |= (rows[:, :, None] & cols[:, None, :])[:, None]
    return mask


def make_mask(
    kind: str,
    n: int,
    size: int,
    *,
    fraction: float = 0.25,
    num_boxes: int = 3,
    box_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A mask of ``kind`` in :data:`MASK_KINDS`: ``centre`` | ``pixels`` | ``boxes``."""
    if kind == "centre":
        return centre_square_mask(n, size, fraction)
    if kind == "pixels":
        return random_pixel_mask(n, size, fraction, generator)
    if kind == "boxes":
        return random_boxes_mask(n, size, num_boxes, box_fraction, generator)
    raise ConfigError(f"mask kind {kind!r} not in {MASK_KINDS}")


def apply_mask(
    x: torch.Tensor,
    mask: torch.Tensor,
    fill: str = "noise",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace the missing pixels of x: ``noise`` U[-1, 1] (where the model's chains start),
    ``zero`` (mid grey) or ``mean`` (each image's mean over its known pixels, per channel)."""
    if fill == "noise":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        value = u * 2 - 1
    elif fill == "zero":
        value = torch.zeros_like(x)
    elif fill == "mean":
        known = (~mask).to(x.dtype)
        mean = (x * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp_min(1)
        value = mean.expand_as(x)
    else:
        raise ConfigError(f"fill {fill!r} not in {FILLS}")
    return torch.where(mask, value, x)


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ConfigError(f"mask fraction must be in (0, 1], got {fraction!r}")


# --- restoration ---------------------------------------------------------------------------


def image_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[x pooled (levels - 1) times, ..., x pooled once, x]: exact 2x2 mean pools, coarse first
    (the data of stage s-1 is stage s's data pooled)."""
    out = [x]
    for _ in range(levels - 1):
        out.insert(0, F.avg_pool2d(out[0], 2))
    return out


def mask_pyramid(mask: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Missing-pixel masks per level, coarse first: a coarse pixel is missing when any of its
    2x2 children is, so a known coarse pixel is the exact pool of known fine pixels."""
    out = [mask.to(torch.bool)]
    for _ in range(levels - 1):
        out.insert(0, F.max_pool2d(out[0].float(), 2).bool())
    return out


class FidelityEnergy:
    """E(x) + w/2 ||x - y||^2: the energy of the posterior p(x | y) for y = x + N(0, s^2 I)
    at likelihood weight w = fidelity / s^2 (w = 0 is the prior E alone)."""

    def __init__(self, energy: Energy, y: torch.Tensor, weight: float):
        self.energy, self.y, self.weight = energy, y, float(weight)
        self.resolution = getattr(energy, "resolution", y.shape[-1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x) + 0.5 * self.weight * (x - self.y).square().flatten(1).sum(1)


def restoration_energies(
    model: CoarseToFineEBM, stage: int | None = None, mode: str = "prior"
) -> list[FrozenEnergy]:
    """Frozen energies for restoration at ``stage`` (default: the finest): E_stage alone
    (``prior``), or every stage's up to it, coarse first (``posterior``)."""
    if mode not in MODES:
        raise ConfigError(f"restore mode {mode!r} not in {MODES}")
    s = model.stage if stage is None else stage
    return stage_energies(model, s, first_stage=0 if mode == "posterior" else s)


def _check_resolution(energies: Sequence[Energy], x: torch.Tensor) -> None:
    r = getattr(energies[-1], "resolution", None)
    if r is not None and tuple(x.shape[-2:]) != (r, r):
        raise ValueError(f"the energy takes {r}x{r} images, got {tuple(x.shape)}")


def _as_energies(model: CoarseToFineEBM | Sequence[Energy], stage, mode) -> list[Energy]:
    if isinstance(model, CoarseToFineEBM):
        return list(restoration_energies(model, stage, mode))
    if stage is not None:
        raise ValueError("stage applies to a CoarseToFineEBM, not to a list of energies")
    return list(model)


def _restoration_chain(
    energies: Sequence[Energy],
    targets: list[torch.Tensor],
    chain: ChainConfig,
    *,
    masks: list[torch.Tensor] | None,
    weights: list[float],
    generator: torch.Generator | None,
    callback: Callback | None,
) -> torch.Tensor:
    """Langevin with energies[0] from targets[0], upsample x2, Langevin with energies[1], ...
    (paper Sec. 3.2's chain, started from the corrupted image's pyramid instead of noise).

    After each upsampling the known pixels (``masks`` False) are reset to ``targets``; level
    i adds the fidelity term of weight ``weights[i]``.
    """
    etas, sigmas = chain.schedules()
    x = targets[0]
    for i, energy in enumerate(energies):
        if i > 0:
            x = upsample2x(x)
            if masks is not None:
                x = torch.where(masks[i], x, targets[i])
        if weights[i] > 0:
            energy = FidelityEnergy(energy, targets[i], weights[i])
        cb = None if callback is None else (lambda d, i=i: callback({**d, "stage": i}))
        x = sample_langevin(
            energy,
            x,
            etas,
            sigmas,
            generator=generator,
            mask=None if masks is None else masks[i],
            callback=cb,
        )
    return x


def denoise(
    model: CoarseToFineEBM | Sequence[Energy],
    noisy: torch.Tensor,
    chain: ChainConfig,
    *,
    mode: str = "prior",
    noise_sigma: float = 0.0,
    fidelity: float = 0.0,
    stage: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Denoising by Langevin started from the noisy image [N, C, r, r].

    ``prior`` (the paper's): K steps of E_stage from the noisy image. ``posterior``: start
    at the coarsest stage from the pooled noisy image (2x2 pooling halves the noise std,
    s_t = noise_sigma / 2^(S - t)), run K steps per stage on
    E_t(x) + fidelity / (2 s_t^2) ||x - y_t||^2 and upsample. The likelihood weight is capped
    at 1 / step_size, where an explicit step on the quadratic stops being a contraction.
    ``model`` may also be a list of energies, coarse first, ending at the image resolution.
    """
    energies = _as_energies(model, stage, mode)
    _check_resolution(energies, noisy)
    levels = len(energies)
    weights = [0.0] * levels
    if mode == "posterior" and fidelity > 0:
        if not noise_sigma > 0:
            raise ConfigError("denoise: fidelity > 0 needs the noise_sigma of the corruption")
        for i in range(levels):
            s_t = noise_sigma / 2 ** (levels - 1 - i)
            weights[i] = min(fidelity / s_t**2, 1.0 / chain.step_size)
    return _restoration_chain(
        energies,
        image_pyramid(noisy, levels),
        chain,
        masks=None,
        weights=weights,
        generator=generator,
        callback=callback,
    )


def inpaint(
    model: CoarseToFineEBM | Sequence[Energy],
    corrupted: torch.Tensor,
    mask: torch.Tensor,
    chain: ChainConfig,
    *,
    mode: str = "prior",
    stage: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Inpainting: Langevin that moves only the missing pixels (``mask`` True, [N, 1, r, r]);
    the known pixels are reset after every step, so they come back bit for bit.

    ``prior`` (the paper's): K steps of E_stage from the corrupted image. ``posterior``:
    the chain starts at the coarsest stage from the pooled corrupted image, where a coarse
    pixel is known when all its children are, and refines stage by stage with the known
    pixels reset after each upsampling.
    """
    energies = _as_energies(model, stage, mode)
    _check_resolution(energies, corrupted)
    levels = len(energies)
    return _restoration_chain(
        energies,
        image_pyramid(corrupted, levels),
        chain,
        masks=mask_pyramid(mask, levels),
        weights=[0.0] * levels,
        generator=generator,
        callback=callback,
    )


# --- quality (torchmetrics) ----------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], float64 (metrics are computed with data range 1)."""
    return (x.double().clamp(-1, 1) + 1) / 2


def psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image [N] in dB of images in [-1, 1] (torchmetrics;
    peak = the full range). With ``mask`` (bool [N, 1, H, W]) over the masked pixels only.
    Identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _unit(x), _unit(y)
    if mask is None:
        return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    m = mask.expand_as(a)
    return torch.stack(
        [peak_signal_noise_ratio(a[i][m[i]], b[i][m[i]], data_range=1.0) for i in range(len(a))]
    )


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image [N] (Wang et al. 2004; torchmetrics: Gaussian window
    of sigma 1.5, reflected at the borders; 0.5 on images of 5 pixels or fewer) of images
    in [-1, 1], measured on the [0, 1] range."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim takes two [N, C, H, W] tensors, got {x.shape} and {y.shape}")
    sigma = 1.5 if min(x.shape[-2:]) > 5 else 0.5
    return structural_similarity_index_measure(
        _unit(x), _unit(y), data_range=1.0, sigma=sigma, reduction="none"
    )


# --- one evaluation over a batch of clean images -------------------------------------------


@dataclass
class RestoreConfig:
    """What :func:`evaluate_restoration` does: the ``restore`` stage's algorithm settings."""

    mode: str = "prior"
    """``prior``: the paper's restoration, Langevin on the restored stage's energy alone
    from the corrupted image; ``posterior``: coarse to fine through every stage, with the
    noisy image's likelihood (``fidelity``) in denoising (see the module docs)."""
    noise_sigma: float = 0.3
    """Denoising: std of the added Gaussian noise, in the [-1, 1] scale."""
    fidelity: float = 0.1
    """posterior denoising: likelihood weight (x s^-2) that keeps the chain near the noisy
    image."""
    masks: tuple[str, ...] = MASK_KINDS
    """Inpainting masks to evaluate, from ``centre``, ``pixels``, ``boxes``."""
    mask_fraction: float = 0.25
    """``centre``: share of the area in the square; ``pixels``: share of missing pixels."""
    num_boxes: int = 3
    """``boxes``: number of boxes (they may overlap)."""
    box_fraction: float = 0.25
    """``boxes``: side of each box as a share of the image side."""
    fill: str = "noise"
    """Initial value of the missing pixels: ``noise`` U[-1, 1] | ``zero`` | ``mean``."""
    denoise_chain: ChainConfig = field(default_factory=ChainConfig)
    """Denoising Langevin (a mapping in params: steps, step_size, noise_start, noise_end)."""
    inpaint_chain: ChainConfig = field(default_factory=ChainConfig)
    """Inpainting Langevin."""
    seed: int = 0
    """Seeds the corruptions (noise, masks, fill) and the Langevin noise."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"restore.mode {self.mode!r} not in {MODES}")
        if isinstance(self.masks, str):
            self.masks = (self.masks,)
        self.masks = tuple(self.masks)
        bad = [m for m in self.masks if m not in MASK_KINDS]
        if bad:
            raise ConfigError(f"restore.masks: {bad} not in {MASK_KINDS}")
        if not self.noise_sigma > 0:
            raise ConfigError(f"restore.noise_sigma must be > 0, got {self.noise_sigma!r}")
        if self.fidelity < 0:
            raise ConfigError(f"restore.fidelity must be >= 0, got {self.fidelity!r}")
        _check_fraction(self.mask_fraction)
        _check_fraction(self.box_fraction)
        if not isinstance(self.num_boxes, int) or self.num_boxes < 1:
            raise ConfigError(f"restore.num_boxes must be an integer >= 1, got {self.num_boxes!r}")
        if self.fill not in FILLS:
            raise ConfigError(f"restore.fill {self.fill!r} not in {FILLS}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["masks"] = list(self.masks)
        return d


PSNR_CORRUPTED, PSNR_RESTORED = "psnr_corrupted", "psnr_restored"
SSIM_CORRUPTED, SSIM_RESTORED = "ssim_corrupted", "ssim_restored"
PSNR_MASKED_CORRUPTED, PSNR_MASKED_RESTORED = "psnr_masked_corrupted", "psnr_masked_restored"
PSNR_CAP = 100.0
"""PSNR of an exact match is +inf; means count it as this many dB."""


@dataclass
class Restoration:
    """One task's images (each [N, C, H, W] in [-1, 1]), its mask, and its mean metrics."""

    corrupted: torch.Tensor
    restored: torch.Tensor
    truth: torch.Tensor
    metrics: dict[str, float]
    mask: torch.Tensor | None = None

    def picture(self, n: int, scale: int = 1) -> bytes:
        """A PNG of the first ``n`` images: rows of corrupted, restored and true ones."""
        from .images import grid_png
        from .sampling import to_uint8

        rows = torch.cat([self.corrupted[:n], self.restored[:n], self.truth[:n]])
        return grid_png(to_uint8(rows).cpu().numpy(), nrow=min(n, len(self.truth)), scale=scale)


def quality(
    truth: torch.Tensor,
    corrupted: torch.Tensor,
    restored: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean PSNR and SSIM of the corrupted input and of the restoration against the truth;
    with a mask also the PSNR over the missing pixels only."""
    m = {
        PSNR_CORRUPTED: _mean_psnr(psnr(corrupted, truth)),
        PSNR_RESTORED: _mean_psnr(psnr(restored, truth)),
        SSIM_CORRUPTED: float(ssim(corrupted, truth).mean()),
        SSIM_RESTORED: float(ssim(restored, truth).mean()),
    }
    if mask is not None:
        m[PSNR_MASKED_CORRUPTED] = _mean_psnr(psnr(corrupted, truth, mask=mask))
        m[PSNR_MASKED_RESTORED] = _mean_psnr(psnr(restored, truth, mask=mask))
    return m


def _mean_psnr(v: torch.Tensor) -> float:
    return float(v.clamp(max=PSNR_CAP).mean())


def evaluate_restoration(
    model: CoarseToFineEBM,
    truth: torch.Tensor,
    cfg: RestoreConfig,
    *,
    stage: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Restoration]:
    """Denoise and inpaint (every mask of ``cfg``) the clean images ``truth`` [N, C, r_s, r_s];
    returns ``{"denoise": ..., "inpaint_<mask>": ...}``. Deterministic given ``cfg.seed``."""
    energies = restoration_energies(model, stage, cfg.mode)
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, Restoration] = {}
    noisy = gaussian_noise(truth, cfg.noise_sigma, gen)
    restored = denoise(
        energies,
        noisy,
        cfg.denoise_chain,
        mode=cfg.mode,
        noise_sigma=cfg.noise_sigma,
        fidelity=cfg.fidelity,
        generator=gen,
    )
    out["denoise"] = Restoration(noisy, restored, truth, quality(truth, noisy, restored))
    if progress:
        progress(f"denoise: {out['denoise'].metrics}")
    n, size = truth.shape[0], truth.shape[-1]
    for kind in cfg.masks:
        mask = make_mask(
            kind,
            n,
            size,
            fraction=cfg.mask_fraction,
            num_boxes=cfg.num_boxes,
            box_fraction=cfg.box_fraction,
            generator=gen,
        ).to(truth.device)
        corrupted = apply_mask(truth, mask, cfg.fill, gen)
        restored = inpaint(
            energies, corrupted, mask, cfg.inpaint_chain, mode=cfg.mode, generator=gen
        )
        result = Restoration(
            corrupted, restored, truth, quality(truth, corrupted, restored, mask), mask
        )
        out[f"inpaint_{kind}"] = result
        if progress:
            progress(f"inpaint_{kind}: {result.metrics}")
    return out


def restoration_study(
    model: CoarseToFineEBM, truth: torch.Tensor, cfg: RestoreConfig, stage: int, grid: int = 16,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict[str, bytes]]:  # fmt: skip
    """:func:`evaluate_restoration` of held-out ``truth`` at ``stage``: (its metrics, with
    PSNR and SSIM per task; a PNG per task of ``grid`` images: corrupted, restored, truth)."""
    log(f"restore: {len(truth)} images at {truth.shape[-1]}x{truth.shape[-1]}, stage {stage}, "
        f"mode {cfg.mode}")  # fmt: skip
    results = evaluate_restoration(
        model, truth, cfg, stage=stage, progress=lambda m: log(f"restore: {m}")
    )
    head = {"stage": stage, "resolution": truth.shape[-1], "num_images": len(truth)}
    metrics = {**head, **{task: res.metrics for task, res in results.items()}}
    scale = max(1, 64 // truth.shape[-1])
    return metrics, {f"{t}.png": res.picture(grid, scale) for t, res in results.items()}
