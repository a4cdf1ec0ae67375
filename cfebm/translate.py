"""One-sided unsupervised image-to-image translation and generative saliency
(paper Sec. 3.4 and its translation experiments; docs/method.md, "Uses of the trained energy").

The translator is a target-domain EBM trained coarse to fine whose negative chains start
from source-domain images (pooled to each stage's resolution) instead of noise; at test
time the same short-run chain, started from a source image, is the translation. No cycle
consistency, one network.

Generative saliency shows where the chain changes the image: the accumulated per-pixel
change sum_k |x_{k+1} - x_k| and the accumulated energy gradient sum_k |dE/dx_k|, each
summed over channels and normalised to [0, 1] per image. Content preservation compares
the translation with its source: SSIM of the grey-level structure and, for scenes of one
object on a background (the built-in ``shapes`` data), the IoU of the object masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import CFEBMConfig, ConfigError, SamplerConfig
from .langevin import Callback
from .loop import Hooks, LoopConfig, fit
from .metrics import Extractors, MetricsConfig, compute_metrics
from .model import CoarseToFineEBM
from .restore import image_pyramid, ssim
from .sampling import sample
from .trainer import Trainer

# --- the translator ------------------------------------------------------------------------


def train_translator(
    cfg: CFEBMConfig,
    target: Mapping[int, torch.Tensor],
    source: Mapping[int, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    loop: LoopConfig | None = None,
    hooks: Sequence[Hooks] = (),
    trainer: Trainer | None = None,
    resumed: bool = False,
) -> Trainer:
    """Train the target-domain EBM coarse to fine with chains started from source images.

    ``target`` and ``source`` map each stage resolution to images [N, C, r, r] in the
    [0, 255] scale (a pyramid's levels). The training is :func:`cfebm.loop.fit`, with
    ``loop`` (checkpoint cadence, rollbacks) and ``hooks``. Pass ``trainer`` to continue one
    (e.g. restored from a checkpoint). Raises :class:`cfebm.trainer.DivergenceError` when
    the rollbacks are spent.
    """
    if trainer is None:
        trainer = Trainer(cfg, target, device, source=source)
    fit(trainer, loop or LoopConfig(), hooks, resumed=resumed)
    return trainer


def translate(
    model: CoarseToFineEBM,
    source: torch.Tensor,
    sampler: SamplerConfig,
    *,
    stage: int | None = None,
    start_stage: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Translations [N, C, r_s, r_s] of source images [N, C, r_s, r_s] in [-1, 1].

    The chain starts from the source pooled to stage ``start_stage``'s resolution (default:
    ``stage`` itself, which is how the translator was trained at its last stage) and runs
    K steps per stage up to ``stage`` (default: the model's finest).
    """
    s = model.stage if stage is None else stage
    t = s if start_stage is None else start_stage
    if not 0 <= t <= s:
        raise ValueError(f"start_stage {t} must be in 0..{s}")
    r = model.resolution(s)
    if tuple(source.shape[-2:]) != (r, r):
        raise ValueError(f"stage {s} translates {r}x{r} images, got {tuple(source.shape)}")
    x_init = image_pyramid(source, s - t + 1)[0]
    return sample(
        model,
        len(source),
        sampler,
        stage=s,
        generator=generator,
        x_init=x_init,
        callback=callback,
    )


# --- generative saliency -------------------------------------------------------------------


class SaliencyAccumulator:
    """A sampler callback that accumulates, per pixel and summed over channels,
    ``change`` = sum_k |x_{k+1} - x_k| and ``gradient`` = sum_k |dE/dx_k| along a chain.

    Give it the chain's start ``x0``. Across a coarse-to-fine chain the maps and the last
    state are upsampled x2 (nearest) with the image, so they end at the final resolution.
    """

    def __init__(self, x0: torch.Tensor):
        self.prev = x0.detach()
        n, _, h, w = x0.shape
        self.change = torch.zeros((n, 1, h, w), dtype=torch.float64, device=x0.device)
        self.gradient = torch.zeros_like(self.change)

    def _match(self, x: torch.Tensor) -> None:
        while self.prev.shape[-1] < x.shape[-1]:
            self.prev = F.interpolate(self.prev, scale_factor=2, mode="nearest")
            self.change = F.interpolate(self.change, scale_factor=2, mode="nearest")
            self.gradient = F.interpolate(self.gradient, scale_factor=2, mode="nearest")

    def __call__(self, d: dict) -> None:
        if d.get("k", 0) < 0:  # the end-of-stage record of sample_coarse_to_fine
            return
        x = d["x"].detach()
        self._match(x)
        self.change += (x - self.prev).abs().sum(1, keepdim=True).double()
        self.gradient += d["grad"].detach().abs().sum(1, keepdim=True).double()
        self.prev = x

    def maps(self) -> dict[str, torch.Tensor]:
        """{"change", "gradient"}: float32 [N, 1, H, W], each scaled to [0, 1] per image."""
        return {"change": normalise_maps(self.change), "gradient": normalise_maps(self.gradient)}


def normalise_maps(m: torch.Tensor) -> torch.Tensor:
    """Scale each map [N, 1, H, W] to [0, 1] by its own min and max (flat maps -> 0)."""
    flat = m.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(1e-12).view(-1, 1, 1, 1)
    return ((m - lo.view(-1, 1, 1, 1)) / span).float()


def translate_with_saliency(
    model: CoarseToFineEBM,
    source: torch.Tensor,
    sampler: SamplerConfig,
    *,
    stage: int | None = None,
    start_stage: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(translations, saliency maps) of :func:`translate`; maps as in
    :class:`SaliencyAccumulator`, [N, 1, r_s, r_s] in [0, 1]."""
    s = model.stage if stage is None else stage
    t = s if start_stage is None else start_stage
    acc = SaliencyAccumulator(image_pyramid(source, s - t + 1)[0])
    out = translate(
        model,
        source,
        sampler,
        stage=s,
        start_stage=t,
        generator=generator,
        callback=acc,
    )
    return out, acc.maps()


def heatmap(maps: torch.Tensor) -> torch.Tensor:
    """Maps [N, 1, H, W] in [0, 1] -> RGB [N, 3, H, W] in [0, 1] ("hot": black, red,
    yellow, white)."""
    t = maps.clamp(0, 1)
    return torch.cat([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], 1)


def saliency_overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """The heatmap of ``maps`` over the grey-level images [N, C, H, W] in [-1, 1]: RGB
    [N, 3, H, W] in [-1, 1], ``alpha`` the heatmap's weight."""
    grey = to_grey((images.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)
    return ((1 - alpha) * grey + alpha * heatmap(maps)) * 2 - 1


# --- content preservation and style statistics ---------------------------------------------

LUMA = (0.299, 0.587, 0.114)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> luma [N, 1, H, W] (ITU-R 601 weights for RGB; grey images as they are)."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def structure_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM [N] of the grey levels of a and b in [-1, 1]: how much structure (edges, layout)
    the translation keeps, whatever the colours."""
    return ssim(to_grey(a), to_grey(b))


def foreground_mask(x: torch.Tensor, min_contrast: float = 0.1) -> torch.Tensor:
    """Object mask bool [N, 1, H, W] of images [N, C, H, W] in [-1, 1]: the pixels that stand
    out from the image's dominant colour.

    The dominant colour is the per-channel median, the background of a scene whose object
    covers less than half of it (the built-in ``shapes``). A pixel is foreground when its
    colour distance to it is above the midpoint between the median distance and the largest
    one, and above ``min_contrast`` (flat images have no object). Being relative to each
    image, the mask follows the object through a change of hue or a shift of the whole
    image's colours, which is what content preservation should ignore.
    """
    median = x.flatten(2).median(2).values[:, :, None, None]  # [N, C, 1, 1]
    d = (x - median).norm(dim=1, keepdim=True)  # [N, 1, H, W]
    flat = d.flatten(1)
    mid = (flat.median(1).values + flat.max(1).values) / 2
    return (d > mid.view(-1, 1, 1, 1)) & (d > min_contrast)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union [N] of bool masks; two empty masks count as 1."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def colour_stats(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel mean and std of a set of images [N, C, H, W] (over the masked pixels
    when ``mask`` is given): [2 C]."""
    c = x.shape[1]
    v = x.transpose(0, 1).reshape(c, -1)  # [C, N*H*W]
    if mask is not None:
        m = mask.expand_as(x).transpose(0, 1).reshape(c, -1)
        v = v[m].view(c, -1)
    return torch.cat([v.mean(1), v.std(1)])


def colour_distance(a: torch.Tensor, b: torch.Tensor, masks=(None, None)) -> float:
    """L2 distance between the :func:`colour_stats` of two image sets."""
    return float((colour_stats(a, masks[0]) - colour_stats(b, masks[1])).norm())


@dataclass
class TranslationScores:
    """Content kept from the source and colour moved toward the target (means over images)."""

    structure_ssim: float
    colour_distance_source: float
    """Colour statistics distance of the *source* images to the target domain."""
    colour_distance_translation: float
    """The same for the translations; lower than the source's = style moved to the target."""
    mask_iou: float | None = None
    foreground_distance_source: float | None = None
    foreground_distance_translation: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def translation_scores(
    source: torch.Tensor,
    translation: torch.Tensor,
    target: torch.Tensor,
    *,
    foreground: bool = True,
    min_contrast: float = 0.1,
) -> TranslationScores:
    """Content preservation (grey-level SSIM; with ``foreground``, the IoU of the object
    masks of :func:`foreground_mask`) and colour statistics toward ``target`` (a sample of
    target-domain images, any count), all [N, C, H, W] in [-1, 1]."""
    scores = TranslationScores(
        structure_ssim=float(structure_ssim(source, translation).mean()),
        colour_distance_source=colour_distance(source, target),
        colour_distance_translation=colour_distance(translation, target),
    )
    if foreground:
        ms, mt, mg = (foreground_mask(v, min_contrast) for v in (source, translation, target))
        scores.mask_iou = float(mask_iou(ms, mt).mean())
        if ms.any() and mt.any() and mg.any():
            scores.foreground_distance_source = colour_distance(source, target, (ms, mg))
            scores.foreground_distance_translation = colour_distance(translation, target, (mt, mg))
    return scores


def evaluate_translation(
    model: CoarseToFineEBM,
    source: torch.Tensor,
    target: torch.Tensor,
    sampler: SamplerConfig,
    *,
    start_stage: int | None = None,
    foreground: bool = True,
    min_contrast: float = 0.1,
    seed: int = 0,
) -> tuple[dict[str, float], torch.Tensor, dict[str, torch.Tensor]]:
    """Translate held-out ``source`` images and measure them against ``target`` images
    (both [N, C, r, r] in [-1, 1]): (content and colour scores with how well each saliency
    map follows the per-pixel change, translations, saliency maps)."""
    gen = torch.Generator(device=source.device).manual_seed(seed)
    y, maps = translate_with_saliency(
        model, source, sampler, start_stage=start_stage, generator=gen
    )
    scores = translation_scores(source, y, target, foreground=foreground, min_contrast=min_contrast)
    change = (y - source).abs().sum(1).flatten()
    metrics = {"resolution": model.resolution(), "num_images": len(source), **scores.as_dict()}
    for name in ("change", "gradient"):
        corr = torch.corrcoef(torch.stack([maps[name].flatten(), change]))[0, 1]
        metrics[f"saliency_corr_{name}"] = float(corr)
    return metrics, y, maps


def translation_pictures(
    source: torch.Tensor,
    translated: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    n: int,
    scale: int,
) -> dict[str, bytes]:
    """PNGs of the first ``n`` translations: ``translation.png`` (a row of sources over a row
    of their translations) and ``saliency.png`` (the same with the change and gradient maps
    of :func:`evaluate_translation` laid over the sources)."""
    from .images import grid_png
    from .sampling import to_uint8

    pair = torch.cat([source[:n], translated[:n]])
    overlays = [saliency_overlay(source[:n], maps[k][:n]) for k in ("change", "gradient")]
    shown = torch.cat([pair.expand(-1, 3, -1, -1), *overlays])
    return {
        "translation.png": grid_png(to_uint8(pair).cpu().numpy(), nrow=n, scale=scale),
        "saliency.png": grid_png(to_uint8(shown).cpu().numpy(), nrow=n, scale=scale),
    }


# --- the stage's evaluation ------------------------------------------------------------------


@dataclass
class Fidelity(Extractors):
    """FID/KID of the translations against the target domain (cfebm.metrics); the domain
    extractor's ``features`` are trained on the target domain."""

    extractors: list[str] = field(default_factory=list)
    """``domain`` and/or ``inception-v3-compat``; empty: no FID/KID."""
    features: str | None = None
    inception_download: bool = False
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(prc=False))


def fidelity_metrics(
    f: Fidelity, translations: np.ndarray, reference: np.ndarray, device, log=print
) -> dict:
    """FID/KID of the uint8 translations against target images, with each extractor."""
    try:
        extractors = f.make()
    except ValueError as e:  # missing or unknown weights (FeatureError, InceptionWeightsError)
        raise ConfigError(f"translate.fidelity: {e}") from e
    out: dict[str, float] = {}
    for ex in extractors:
        values = compute_metrics(translations, reference, ex, f.metrics, device=device)
        log("translate: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        out.update(values)
    return out


@dataclass
class TranslationConfig:
    """How held-out translations are made and measured (the ``translate`` stage's
    algorithm settings)."""

    split: str = "test"
    """Held-out source split that is translated (and the target's reference split)."""
    num_images: int | None = 256
    """Held-out images translated (seeded subset); null: all."""
    start_stage: int | None = None
    """Stage whose resolution the translation chain starts at; null: the finest."""
    foreground: bool = True
    """Measure the object-mask IoU (scenes of one object on a background, e.g. shapes)."""
    foreground_min_contrast: float = 0.1
    grid_images: int = 16
    seed: int = 0
    """Seeds the held-out subset and the translation chains."""
    fidelity: Fidelity = field(default_factory=Fidelity)


def translation_study(
    model: CoarseToFineEBM, source, target, sampler: SamplerConfig, cfg: TranslationConfig,
    device="cpu", log=print,
) -> tuple[dict, dict[str, bytes]]:  # fmt: skip
    """Translate held-out images of the pyramid ``source`` toward the pyramid ``target``
    (:func:`evaluate_translation`, then :func:`fidelity_metrics`): (the metrics, the PNGs
    of :func:`translation_pictures`)."""
    from .data import to_unit_range
    from .sampling import to_uint8

    r = model.resolution()
    xs = to_unit_range(source.subset(cfg.split, r, cfg.num_images, cfg.seed)).to(device)
    xt = to_unit_range(target.subset(cfg.split, r, cfg.num_images, cfg.seed + 1)).to(device)
    metrics, y, maps = evaluate_translation(
        model, xs, xt, sampler, start_stage=cfg.start_stage, foreground=cfg.foreground,
        min_contrast=cfg.foreground_min_contrast, seed=cfg.seed,
    )  # fmt: skip
    uint8 = [to_uint8(v).cpu().numpy() for v in (y, xt)]
    metrics.update(fidelity_metrics(cfg.fidelity, *uint8, device, log))
    n, scale = min(cfg.grid_images, len(xs)), max(1, 64 // r)
    return metrics, translation_pictures(xs, y, maps, n, scale)
