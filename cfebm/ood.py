"""Out-of-distribution detection with the energy as the score (the paper's OOD
experiments; docs/method.md, "Uses of the trained energy").

A trained EBM gives in-distribution images low energy, so E(x) itself is the score: AUROC of
the in-distribution test split against each out-of-distribution set, where an OOD image
counts as detected when its energy is higher. The sets follow the paper's list where no
download is needed: uniform noise, constant images, linear interpolations between test
images, and any other data set on hand (e.g. ``shapes`` or a folder against ``digits``).

Images are float [N, C, r, r] in [-1, 1] at the resolution of the scoring stage.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import PyramidStore, to_unit_range
from .frozen import FrozenEnergy
from .langevin import Energy
from .model import CoarseToFineEBM

BUILTIN_SETS = ("uniform", "constant", "interpolation")
MEAN = "mean"
"""Key of the mean AUROC over the sets in :func:`auroc_report`."""


# --- scores --------------------------------------------------------------------------------


@torch.no_grad()
def energy_scores(
    model: CoarseToFineEBM | Energy,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    stage: int | None = None,
) -> torch.Tensor:
    """Energies [N] (float64, CPU) of ``images`` [N, C, r, r] in batches; higher = more OOD.

    ``model`` is a CoarseToFineEBM (scored with the frozen energy of ``stage``'s own
    network, default its finest) or any energy callable.
    """
    if isinstance(model, CoarseToFineEBM):
        t = model.stage if stage is None else stage
        energy, device = FrozenEnergy(model.nets[t]), model.device
    else:
        energy, device = model, images.device
    out = [
        energy(images[i : i + batch_size].to(device)).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


# --- out-of-distribution sets ---------------------------------------------------------------


def uniform_noise_set(
    n: int, channels: int, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pixels i.i.d. U[-1, 1]: [n, C, r, r]."""
    return torch.rand((n, channels, size, size), generator=generator) * 2 - 1


def constant_set(
    n: int, channels: int, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One random colour per image (each channel U[-1, 1]), the same at every pixel."""
    colour = torch.rand((n, channels, 1, 1), generator=generator) * 2 - 1
    return colour.expand(n, channels, size, size).contiguous()


def interpolation_set(
    images: torch.Tensor,
    n: int,
    alpha: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """alpha * x_i + (1 - alpha) * x_j for ``n`` random pairs i != j of ``images``: blends
    that keep the low-level statistics of the data but are not data themselves."""
    m = len(images)
    if m < 2:
        raise ValueError("interpolations need at least two images")
    i = torch.randint(0, m, (n,), generator=generator)
    j = (i + torch.randint(1, m, (n,), generator=generator)) % m  # never i
    return alpha * images[i] + (1 - alpha) * images[j]


def match_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Images of another data set made comparable: RGB -> grey (ITU-R 601 luma) or grey ->
    RGB (repeated), then area-resized (down) or bilinear-resized (up) to ``size``."""
    c = x.shape[1]
    if c != channels:
        if channels == 1 and c == 3:
            w = torch.tensor((0.299, 0.587, 0.114), dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * w.to(x.device)).sum(1, keepdim=True)
        elif channels == 3 and c == 1:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
    if x.shape[-1] > size:
        x = F.adaptive_avg_pool2d(x, size)
    elif x.shape[-1] < size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous()


@dataclass
class OODConfig:
    """Which sets to build and how (the ``ood`` stage's algorithm settings)."""

    sets: tuple[str, ...] = BUILTIN_SETS
    """Built-in OOD sets, from ``uniform``, ``constant``, ``interpolation``."""
    num_images: int = 1000
    """Images per OOD set (and at most this many in-distribution test images)."""
    interpolation_alpha: float = 0.5
    """Weight of the first image in each interpolation."""
    batch_size: int = 256
    seed: int = 0
    other: dict[str, str] = field(default_factory=dict)
    """Other data sets, name -> dataset root (read by the stage, not by this module)."""

    def __post_init__(self) -> None:
        if isinstance(self.sets, str):
            self.sets = (self.sets,)
        self.sets = tuple(self.sets)
        bad = [s for s in self.sets if s not in BUILTIN_SETS]
        if bad:
            raise ConfigError(f"ood.sets: {bad} not in {BUILTIN_SETS}")
        if not isinstance(self.num_images, int) or self.num_images < 2:
            raise ConfigError(f"ood.num_images must be an integer >= 2, got {self.num_images!r}")
        if not 0 < self.interpolation_alpha < 1:
            raise ConfigError("ood.interpolation_alpha must be in (0, 1)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"ood.batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.other, Mapping):
            raise ConfigError("ood.other must map names to dataset roots")
        self.other = dict(self.other)
        clash = sorted(set(self.other) & {*BUILTIN_SETS, MEAN})
        if clash:
            raise ConfigError(f"ood.other names {clash} clash with built-in set names")


def builtin_sets(images: torch.Tensor, cfg: OODConfig) -> dict[str, torch.Tensor]:
    """The built-in OOD sets of ``cfg`` for in-distribution ``images`` [N, C, r, r]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    _, c, r, _ = images.shape
    n = cfg.num_images
    out = {}
    for name in cfg.sets:  # in config order, each from the same generator: reproducible
        if name == "uniform":
            out[name] = uniform_noise_set(n, c, r, gen)
        elif name == "constant":
            out[name] = constant_set(n, c, r, gen)
        else:
            out[name] = interpolation_set(images.cpu(), n, cfg.interpolation_alpha, gen)
    return out


# --- AUROC ---------------------------------------------------------------------------------


def auroc(scores_in: torch.Tensor | np.ndarray, scores_out: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve for telling OOD from in-distribution by energy.

    OOD is the positive class and the energy the score, so 1.0 means every OOD image has a
    higher energy than every in-distribution image, 0.5 is chance, and ties count half
    (the Mann-Whitney U statistic).
    """
    from sklearn.metrics import roc_auc_score

    y, s = _labels_scores(scores_in, scores_out)
    return float(roc_auc_score(y, s))


def roc_curve(
    scores_in: torch.Tensor | np.ndarray, scores_out: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the energy threshold sweep, OOD positive."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    y, s = _labels_scores(scores_in, scores_out)
    fpr, tpr, _ = sk_roc_curve(y, s)
    return fpr, tpr


def _labels_scores(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(scores_in, dtype=np.float64).ravel()
    b = np.asarray(scores_out, dtype=np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD score")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("energies contain NaN or inf; the model may have diverged")
    return np.concatenate([np.zeros(len(a)), np.ones(len(b))]), np.concatenate([a, b])


def auroc_report(
    scores_in: torch.Tensor, scores_out: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """{set name: AUROC} for every OOD set, plus ``"mean"`` over them."""
    report = {name: auroc(scores_in, s) for name, s in scores_out.items()}
    if report:
        report[MEAN] = float(np.mean(list(report.values())))
    return report


# --- plots ---------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas: no pyplot, no global backend, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def roc_plot_png(scores_in: torch.Tensor, scores_out: Mapping[str, torch.Tensor]) -> bytes:
    """PNG of the ROC curve of every OOD set against the in-distribution scores."""
    fig, ax = _figure(4.5, 4.5)
    for name, s in scores_out.items():
        fpr, tpr = roc_curve(scores_in, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(scores_in, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("OOD detection by energy")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def energy_histogram_png(
    scores_in: torch.Tensor, scores_out: Mapping[str, torch.Tensor], bins: int = 50
) -> bytes:
    """PNG of the energy histograms of the in-distribution test split and every OOD set."""
    groups = {"in-distribution": scores_in, **scores_out}
    values = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in groups.values()])
    edges = np.histogram_bin_edges(values, bins=bins)
    fig, ax = _figure(6, 3.5)
    for name, s in groups.items():
        ax.hist(np.asarray(s, dtype=np.float64), bins=edges, alpha=0.5, density=True, label=name)
    ax.set(xlabel="energy E(x)", ylabel="density")
    ax.legend(fontsize=8)
    return _png(fig)


@dataclass
class OODStudy:
    """What :func:`ood_study` found: ``metrics`` (AUROC per set and their mean, mean
    energies), ``pngs`` (roc.png, energy_hist.png, sets.png: a row of each set), ``roc``
    (each set's ROC curve as rows of fpr, tpr) and ``scores`` (every image's energy)."""

    metrics: dict
    pngs: dict[str, bytes]
    roc: dict[str, list[dict]]
    scores: dict[str, list[float]]


def _row(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` images, padded with black ones so each set fills one grid row."""
    return torch.cat([x[:n], x.new_full((max(0, n - len(x)), *x.shape[1:]), -1.0)])


def ood_study(
    model: CoarseToFineEBM,
    images: torch.Tensor,
    cfg: OODConfig,
    stage: int,
    other: Mapping[str, PyramidStore] | None = None,
    grid_images: int = 16,
    log=print,
    split: str = "test",
) -> OODStudy:
    """Score held-out ``images`` [N, C, r, r] in [-1, 1] against the built-in sets of
    ``cfg`` and the ``split`` of the ``other`` pyramids (their level nearest above the
    model's resolution, converted to its channels and resolution) by the energy of
    ``stage``."""
    from .images import grid_png
    from .sampling import to_uint8

    r, c = model.resolution(stage), model.cfg.channels
    sets = builtin_sets(images, cfg)
    for name, store in (other or {}).items():
        level = min((q for q in store.resolutions if q >= r), default=store.resolutions[-1])
        sets[name] = match_images(to_unit_range(store.read(split, level)[: cfg.num_images]), c, r)
    log(f"ood: {len(images)} in-distribution images at {r}x{r}; sets {list(sets)}")
    scores_in = energy_scores(model, images, batch_size=cfg.batch_size, stage=stage)
    scores_out = {
        k: energy_scores(model, x, batch_size=cfg.batch_size, stage=stage) for k, x in sets.items()
    }
    report = auroc_report(scores_in, scores_out)
    log("ood: AUROC " + ", ".join(f"{k} {v:.4f}" for k, v in report.items()))
    means = {"in": float(scores_in.mean()), **{k: float(v.mean()) for k, v in scores_out.items()}}
    metrics = {"stage": stage, "resolution": r, "num_in": len(images), "auroc": report}
    shown = torch.cat([_row(x, grid_images) for x in (images, *sets.values())])
    pngs = {
        "roc.png": roc_plot_png(scores_in, scores_out),
        "energy_hist.png": energy_histogram_png(scores_in, scores_out),
        "sets.png": grid_png(to_uint8(shown).numpy(), nrow=grid_images, scale=max(1, 64 // r)),
    }
    roc = {}
    for name, s in scores_out.items():
        fpr, tpr = roc_curve(scores_in, s)
        roc[name] = [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr)]
    scores = {"in": scores_in.tolist(), **{k: v.tolist() for k, v in scores_out.items()}}
    return OODStudy({**metrics, "energy_mean": means}, pngs, roc, scores)
