"""A small domain feature extractor: the offline stand-in for Inception in FID/KID.

Inception weights cannot be downloaded on an offline machine. Instead of reporting a
number that pretends to be Inception FID, the ``features`` stage trains :class:`FeatureNet`,
a CNN classifier on the labelled built-in data (digits, shapes, a labelled folder), and the
metrics use its penultimate layer as the feature space. Its name, ``cfebm-<dataset>-cnn``,
travels into every metric key.

The network sees one resolution, ``FeatureNetConfig.resolution`` (the finest level of the
pyramid); images of other sizes are resized to it (:func:`resize_to`), as Inception resizes
everything to 299x299. With ``multiscale`` training it also learns from every coarser
pyramid level brought to that size the same way, so coarse stages are measured in a
feature space that has seen coarse images.

A weights file (format ``cfebm-features/1``) holds the config, the state dict and metadata
(dataset, resolution, channels, label fields, test accuracy). Pure PyTorch + numpy + fsspec.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import io as cio

FORMAT = "cfebm-features/1"
FEATURE_LAYER = "penultimate"
"""The feature layer that FID, KID and precision/recall use (input of the classifier heads)."""
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
"""Extractor names: lower-case letters, digits and '-', so that ``<metric>_<name>`` is a
valid MLflow metric name and DVC key, and splits back at its last '_'."""


class FeatureError(ValueError):
    """A feature extractor file or setting that cannot be used; the message names it."""


def check_name(name: str) -> str:
    """``name`` if it is a valid extractor name (see :data:`NAME_PATTERN`), else FeatureError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise FeatureError(
            f"feature extractor name {name!r} must be lower-case letters, digits and '-' "
            "(it becomes part of metric names)"
        )
    return name


def default_name(dataset: str) -> str:
    """``cfebm-<dataset>-cnn`` with the dataset name reduced to [a-z0-9-]."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(dataset).lower()).strip("-") or "data"
    return f"cfebm-{slug}-cnn"


@dataclass
class FeatureNetConfig:
    """Architecture of :class:`FeatureNet`."""

    channels: int = 1
    resolution: int = 16
    """Input size; other sizes are resized to it."""
    num_classes: tuple[int, ...] = (10,)
    """Classes per label field (digits: (10,); shapes: (5, 8) for shape and colour)."""
    width: int = 32
    """Channels of the first conv; doubled at each 2x downsampling, up to 4x."""
    feature_dim: int = 128
    """Size of the penultimate layer, the feature space of the metrics."""

    def __post_init__(self) -> None:
        self.num_classes = tuple(int(k) for k in self.num_classes)
        if self.channels < 1:
            raise FeatureError(f"channels must be >= 1, got {self.channels}")
        r = self.resolution
        if not (isinstance(r, int) and r >= 4 and r & (r - 1) == 0):
            raise FeatureError(f"resolution must be a power of two >= 4, got {r!r}")
        if not self.num_classes or min(self.num_classes) < 2:
            raise FeatureError(f"num_classes needs >= 2 classes per field, got {self.num_classes}")
        if self.width < 1 or self.feature_dim < 1:
            raise FeatureError("width and feature_dim must be >= 1")


def _conv_bn_act(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]


class FeatureNet(nn.Module):
    """conv3x3 stem, [conv3x3 - avgpool 2] down to 4x4, conv3x3 (each conv with batch norm
    and SiLU), then a linear + SiLU penultimate layer on the flattened 4x4 map (the
    features: they keep the layout, which shape classes need) and one linear head per label
    field. Batch norm is what makes shape classes learnable in a few epochs (colour alone
    is easy); in eval mode it is a fixed affine map.
    """

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = [*_conv_bn_act(cfg.channels, w)]
        size = cfg.resolution
        while size > 4:
            w_next = min(2 * w, 4 * cfg.width)
            layers += [*_conv_bn_act(w, w_next), nn.AvgPool2d(2)]
            w, size = w_next, size // 2
        layers += _conv_bn_act(w, w)
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(w * 4 * 4, cfg.feature_dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.feature_dim, k) for k in cfg.num_classes)
        # Set after training (calibrate_feature_scale) so that real images have features of
        # mean square 1: FID/KID then come in units that do not depend on the training run.
        self.register_buffer("feature_scale", torch.ones(()))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim] of images x [B, C, r, r] in [-1, 1]."""
        h = self.body(x).flatten(1)  # [B, w * 4 * 4]
        return F.silu(self.fc(h))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The metrics' features [B, feature_dim]: penultimate activations, calibrated."""
        return self.penultimate(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits [B, k_j] for each label field j."""
        f = self.penultimate(x)
        return [head(f) for head in self.heads]


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images [B, C, h, w] -> [B, C, size, size]: area averaging when shrinking (an
    exact mean pool for the pyramid's factors of two), bilinear when enlarging."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def to_input(images: torch.Tensor, cfg: FeatureNetConfig) -> torch.Tensor:
    """Images in the [0, 255] scale [B, C, h, w] (uint8 or float) -> the net's input in
    [-1, 1] at its resolution; one channel is repeated when the net expects three."""
    x = images.float()
    c = x.shape[1]
    if c != cfg.channels:
        if c == 1:
            x = x.expand(-1, cfg.channels, -1, -1)
        else:
            raise FeatureError(f"the feature net takes {cfg.channels}-channel images, got {c}")
    return resize_to(x, cfg.resolution) / 127.5 - 1.0


@dataclass
class FeatureTrainConfig:
    """Training of the domain feature extractor (params.yaml section ``features``)."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 32
    feature_dim: int = 128
    multiscale: bool = True
    """Also train on every coarser pyramid level, resized to the finest resolution."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "width", "feature_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FeatureError(f"features.{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise FeatureError("features.lr must be > 0 and features.weight_decay >= 0")


@dataclass
class LabelledImages:
    """Images per resolution ([N, C, r, r], [0, 255] scale) and labels [N, L] of one split."""

    images: Mapping[int, np.ndarray]
    labels: np.ndarray

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        self.labels = labels[:, None] if labels.ndim == 1 else labels
        for r, a in self.images.items():
            if len(a) != len(self.labels):
                raise FeatureError(f"{len(a)} images at {r} but {len(self.labels)} labels")

    @property
    def finest(self) -> int:
        return max(self.images)


@dataclass
class FeatureExtractorFile:
    """What a weights file holds: the network and what it was trained on."""

    name: str
    net: FeatureNet
    meta: dict = field(default_factory=dict)


def _batch(
    levels: list[np.ndarray], idx: torch.Tensor, level: torch.Tensor, cfg: FeatureNetConfig
) -> torch.Tensor:
    """Images ``idx``, image i at pyramid level ``level[i]``, as the net's input
    [B, C, r, r]; resized per batch, so memory holds only the pyramid itself."""
    x = torch.empty((len(idx), cfg.channels, cfg.resolution, cfg.resolution))
    for j, images in enumerate(levels):
        sel = torch.nonzero(level == j).flatten()
        if len(sel):
            chosen = np.array(images[idx[sel].numpy()], dtype=np.float32)  # [b, C, r_j, r_j]
            x[sel] = to_input(torch.from_numpy(chosen), cfg)
    return x


@torch.no_grad()
def accuracy(
    net: FeatureNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 512
) -> list[float]:
    """Per-field accuracy of ``net`` on images [N, C, r, r] ([0, 255]) with labels [N, L]."""
    net.eval()
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(len(labels), -1)
    correct = torch.zeros(labels.shape[1])
    for start in range(0, len(labels), batch_size):
        x = to_input(torch.from_numpy(np.array(images[start : start + batch_size])), net.cfg)
        y = labels[start : start + batch_size]
        for j, logits in enumerate(net(x)):
            correct[j] += (logits.argmax(1) == y[:, j]).sum()
    return (correct / max(len(labels), 1)).tolist()


@torch.no_grad()
def calibrate_feature_scale(net: FeatureNet, images: np.ndarray, batch_size: int = 512) -> float:
    """Set ``net.feature_scale`` so that the features of ``images`` ([0, 255] scale) have
    mean square 1 per dimension; returns the scale."""
    net.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = to_input(torch.from_numpy(np.array(images[start : start + batch_size])), net.cfg)
        f = net.penultimate(x)
        total += float(f.double().pow(2).sum())
        count += f.numel()
    scale = 1.0 / max(total / max(count, 1), 1e-12) ** 0.5
    net.feature_scale.fill_(scale)
    return scale


def train_feature_net(
    train: LabelledImages,
    cfg: FeatureTrainConfig,
    num_classes: Sequence[int],
    *,
    progress: Callable[[int, float], None] | None = None,
) -> FeatureNet:
    """Train a classifier on ``train`` (cross-entropy summed over label fields; AdamW with a
    one-cycle learning-rate schedule).

    Deterministic given ``cfg.seed``: initialisation, data order and level choice come from
    seeded generators, and the global RNG is left as it was. With ``multiscale`` each image
    of a batch is taken at a random pyramid level (resized to the finest resolution), so the
    features stay meaningful for every stage's samples. Finally the feature scale is
    calibrated on the finest training images (:func:`calibrate_feature_scale`).
    """
    net_cfg = FeatureNetConfig(
        channels=int(next(iter(train.images.values())).shape[1]),
        resolution=train.finest,
        num_classes=tuple(num_classes),
        width=cfg.width,
        feature_dim=cfg.feature_dim,
    )
    resolutions = sorted(train.images) if cfg.multiscale else [train.finest]
    levels = [train.images[r] for r in resolutions]
    y_all = torch.from_numpy(train.labels)  # [N, fields]
    n = len(y_all)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = FeatureNet(net_cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-n // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
    )
    net.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            level = torch.randint(len(levels), (len(idx),), generator=gen)
            x, y = _batch(levels, idx, level, net_cfg), y_all[idx]  # [B, C, r, r], [B, fields]
            loss = sum(F.cross_entropy(logits, y[:, j]) for j, logits in enumerate(net(x)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if progress is not None:
            progress(epoch, total / n)
    calibrate_feature_scale(net, train.images[train.finest])
    return net.eval()


def save_feature_net(net: FeatureNet, url: str, name: str, meta: Mapping | None = None) -> None:
    """Write ``net`` with its name and metadata to ``url`` (any fsspec URL), atomically."""
    payload = {
        "format": FORMAT,
        "name": check_name(name),
        "config": asdict(net.cfg),
        "state_dict": net.state_dict(),
        "meta": dict(meta or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    cio.write_bytes(url, buf.getvalue())


def load_feature_net(url: str, map_location: str | torch.device = "cpu") -> FeatureExtractorFile:
    """Read a file written by :func:`save_feature_net`; a FeatureError naming ``url`` when it
    is missing, unreadable or not a cfebm feature extractor."""
    try:
        data = cio.read_bytes(url)
    except FileNotFoundError as e:
        raise FeatureError(
            f"feature extractor weights {url} not found (train them with "
            "`python -m pipelines.features`)"
        ) from e
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # pickle / zip errors: name the file, not the internals
        raise FeatureError(f"{url} is not a readable PyTorch file ({type(e).__name__}: {e})") from e
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != FORMAT:
        raise FeatureError(
            f"{url} is not a cfebm feature extractor (format {fmt!r}, expected {FORMAT!r})"
        )
    try:
        net = FeatureNet(FeatureNetConfig(**payload["config"]))
        net.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, FeatureError) as e:
        raise FeatureError(f"{url}: weights do not fit the recorded architecture ({e})") from e
    net.requires_grad_(False)
    return FeatureExtractorFile(check_name(payload["name"]), net.eval(), dict(payload["meta"]))


def label_layout(store) -> tuple[list[str], list[int]]:
    """(field names, classes per field) of a labelled pyramid dataset, from its manifest."""
    if not store.has_labels:
        raise FeatureError(
            f"{store.url} has no labels: the domain extractor is a classifier and needs a "
            "labelled dataset (digits, shapes, or a folder with folder_labels)"
        )
    names = store.label_names
    if names and isinstance(names[0], list):
        counts = [len(n) for n in names]
    elif names:
        counts = [len(names)]
    else:
        labels = store.labels("train").reshape(store.count("train"), -1)
        counts = [int(c) + 1 for c in labels.max(axis=0)]
    fields_ = store.manifest.get("label_fields") or (
        ["class"] if len(counts) == 1 else [f"label{j}" for j in range(len(counts))]
    )
    return list(fields_), counts


def rotations(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the images turned by 0, 90, 180 and 270 degrees, the turn of each as its label):
    the self-supervised task (Gidaris et al. 2018) that trains an extractor on data
    without labels."""
    turned = np.concatenate([np.rot90(images, k, axes=(2, 3)) for k in range(4)])
    return np.ascontiguousarray(turned), np.repeat(np.arange(4), len(images))


def _split(store, split: str, rotate: bool) -> LabelledImages:
    images = {r: np.asarray(store.read(split, r)) for r in store.resolutions}
    if not rotate:
        return LabelledImages(images, store.labels(split))
    turned = {r: rotations(a) for r, a in images.items()}
    return LabelledImages({r: t[0] for r, t in turned.items()}, next(iter(turned.values()))[1])


def fit_extractor(
    store, cfg: FeatureTrainConfig, name: str | None = None, log: Callable[[str], None] = print
) -> tuple[FeatureNet, str, dict]:
    """(the domain CNN trained on ``store``'s train split, its name, its metadata with the
    test accuracy at every pyramid level). A dataset without labels trains it to tell how
    an image was turned (``cfebm-<dataset>-rot-cnn``)."""
    source = (store.manifest.get("source") or {}).get("source", "data")
    rotate = not store.has_labels
    default = default_name(source)
    name = check_name(name or (default.replace("-cnn", "-rot-cnn") if rotate else default))
    label_fields, num_classes = (["rotation"], [4]) if rotate else label_layout(store)
    data = _split(store, "train", rotate)
    classes = ", ".join(f"{f}: {k}" for f, k in zip(label_fields, num_classes))
    log(
        f"features: training {name} on {store.count('train')} {source} images at "
        f"{store.resolutions} (classes per label: {classes})"
    )
    net = train_feature_net(
        data,
        cfg,
        num_classes,
        progress=lambda e, loss: log(f"features: epoch {e + 1}/{cfg.epochs} loss {loss:.4f}"),
    )
    test_accuracy = {}
    if "test" in store.splits and store.count("test") > 0:
        test = _split(store, "test", rotate)
        for r in store.resolutions[::-1]:
            acc = accuracy(net, test.images[r], test.labels)
            test_accuracy[f"r{r}"] = dict(zip(label_fields, acc))
    meta = {
        "dataset": source,
        "resolution": net.cfg.resolution,
        "resolutions": store.resolutions,
        "channels": net.cfg.channels,
        "label_fields": label_fields,
        "num_classes": num_classes,
        "train_count": store.count("train"),
        "test_accuracy": test_accuracy,
        "feature_scale": float(net.feature_scale),
        "train": asdict(cfg),
    }
    return net, name, meta
