"""FID, KID and precision/recall of generated images against data, through torch-fidelity.

Two feature extractors, always named in the result keys so that a number never pretends to
come from another one:

- ``inception-v3-compat``: torch-fidelity's standard InceptionV3. Its weights come from a
  path or any fsspec URL (copied once into a local cache), or, when no path is given, from
  torch-fidelity's standard download (only if it is already in the torch hub cache or the
  network answers). Missing or wrong weights raise :class:`InceptionWeightsError` naming
  the file and saying what to do.
- ``cfebm-<dataset>-cnn``: the domain extractor of :mod:`cfebm.features`, trained by the
  ``features`` stage; registered with torch-fidelity under its own name.

Result keys are ``<metric>_<extractor>``, e.g. ``fid_cfebm-digits-cnn`` or
``kid_mean_inception-v3-compat``: valid MLflow metric names and DVC metrics keys, and the
extractor is the part after the last ``_`` (extractor names never contain one).

torch-fidelity caches features and statistics on disk (``~/.cache/torch/fidelity_cache``)
for inputs that have a cache name (registered datasets or ``input*_cache_name``). The
inputs here are in-memory arrays without cache names and ``cache=False`` is passed, so a
result is always computed from the arrays given, never read from a stale cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from . import io as cio
from .config import SCORE_EXTRACTORS
from .features import FEATURE_LAYER, FeatureError, check_name, load_feature_net, to_input

INCEPTION = "inception-v3-compat"
DOMAIN = "domain"
"""The extractor choice that means "the domain CNN given by its weights file"."""

# Result keys, before the extractor suffix.
FID = "fid"
KID_MEAN = "kid_mean"
KID_STD = "kid_std"
PRECISION = "precision"
RECALL = "recall"
F_SCORE = "f_score"

_FIDELITY_KEYS = {
    torch_fidelity.KEY_METRIC_FID: FID,
    torch_fidelity.KEY_METRIC_KID_MEAN: KID_MEAN,
    torch_fidelity.KEY_METRIC_KID_STD: KID_STD,
    torch_fidelity.KEY_METRIC_PRECISION: PRECISION,
    torch_fidelity.KEY_METRIC_RECALL: RECALL,
    torch_fidelity.KEY_METRIC_F_SCORE: F_SCORE,
}

WEIGHTS_CACHE_ENV = "CFEBM_WEIGHTS_CACHE"


class InceptionWeightsError(ValueError):
    """Inception weights were asked for but are missing, unreachable or not InceptionV3's."""


def metric_key(metric: str, extractor: str) -> str:
    """``<metric>_<extractor>``, e.g. ``fid_cfebm-digits-cnn``."""
    return f"{metric}_{extractor}"


def split_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`metric_key`: ``"kid_mean_inception-v3-compat"`` ->
    ``("kid_mean", "inception-v3-compat")``."""
    metric, _, extractor = key.rpartition("_")
    return metric, extractor


@dataclass
class MetricsConfig:
    """Which metrics and their settings (torch-fidelity's names in brackets)."""

    fid: bool = True
    kid: bool = True
    prc: bool = True
    """Precision/recall/F-score (k-NN in feature space, O(N^2) distances: cheap for
    N up to ~10^4)."""
    batch_size: int = 64
    """Images per feature-extractor forward [batch_size]."""
    kid_subsets: int = 100
    """[kid_subsets]"""
    kid_subset_size: int = 1000
    """[kid_subset_size]; lowered to the smaller sample count when there are fewer images."""
    prc_neighborhood: int = 3
    """k of the k-NN balls in precision/recall [prc_neighborhood]."""
    seed: int = 0
    """Seeds the KID subsets [rng_seed]."""

    def __post_init__(self) -> None:
        if not (self.fid or self.kid or self.prc):
            raise ValueError("metrics: at least one of fid, kid, prc must be on")
        for name in ("batch_size", "kid_subsets", "kid_subset_size", "prc_neighborhood"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"metrics.{name} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class Extractor:
    """A feature extractor registered with torch-fidelity and the local weights it loads."""

    name: str
    weights_path: str | None
    channels: int | None = None
    """Channels the extractor takes; 1-channel images are repeated to this many."""
    layer: str | None = None
    """Feature layer for all metrics; None: the extractor's default (Inception: '2048')."""

    @property
    def label(self) -> str:
        """The extractor as named in result keys: its name, plus the layer when not the
        default (``inception-v3-compat-64``)."""
        if self.layer is None:
            return self.name
        return f"{self.name}-{re.sub(r'[^a-z0-9]+', '-', self.layer.lower()).strip('-')}"


# --- the domain extractor as a torch-fidelity feature extractor ----------------------------


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity adapter of a :class:`cfebm.features.FeatureNet` weights file.

    torch-fidelity instantiates it by name with ``feature_extractor_weights_path`` (a path
    or fsspec URL of a ``cfebm-features/1`` file); the name in the file must be the name it
    was registered and asked for under, so a metric key can never name the wrong network.
    Inputs are uint8 [B, C, H, W]; other sizes are resized to the net's resolution.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise FeatureError(
                f"feature extractor {name!r} needs its weights file "
                "(feature_extractor_weights_path), written by `python -m pipelines.features`"
            )
        loaded = load_feature_net(feature_extractor_weights_path)
        if loaded.name != name:
            raise FeatureError(
                f"{feature_extractor_weights_path} holds extractor {loaded.name!r}, not {name!r}"
            )
        self.net = loaded.net

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise FeatureError("the domain extractor has no ImageNet logits: no Inception Score")
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros((1, 3, 16, 16), dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise FeatureError(
                f"expected uint8 [B, C, H, W] images, got {x.dtype} {tuple(x.shape)}"
            )
        features = self.net.features(to_input(x, self.net.cfg))  # [B, feature_dim]
        return (features.float(),)


def register_domain_extractor(name: str) -> None:
    """Register :class:`DomainFeatureExtractor` with torch-fidelity under ``name`` (idempotent)."""
    check_name(name)
    registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if registered is DomainFeatureExtractor:
        return
    if registered is not None:
        raise FeatureError(
            f"{name!r} is already a torch-fidelity extractor ({registered.__name__})"
        )
    torch_fidelity.register_feature_extractor(name, DomainFeatureExtractor)


def domain_extractor(weights: str) -> Extractor:
    """The domain CNN of the weights file at ``weights`` (path or fsspec URL), registered
    under the name the file records."""
    loaded = load_feature_net(weights)
    register_domain_extractor(loaded.name)
    return Extractor(loaded.name, weights, channels=loaded.net.cfg.channels)


# --- Inception weights --------------------------------------------------------------------


def default_weights_cache() -> str:
    """``$CFEBM_WEIGHTS_CACHE``, else ``$XDG_CACHE_HOME/cfebm/weights`` (``~/.cache``)."""
    if os.environ.get(WEIGHTS_CACHE_ENV):
        return os.environ[WEIGHTS_CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cfebm", "weights")


def _cached_copy(url: str, cache_dir: str) -> str:
    """Local copy of remote file ``url``, keyed by the URL and the object's listing info
    (size, mtime/etag), so a replaced object is fetched again rather than served stale."""
    fs, path = cio.fs_and_path(url)
    key = hashlib.sha256(f"{url}\n{fs.ukey(path)}".encode()).hexdigest()[:16]
    local = os.path.join(cache_dir, f"{key}-{os.path.basename(path) or 'weights.pth'}")
    if not os.path.exists(local):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.get_file(path, tmp)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return local


def _hub_inception_path() -> str:
    """Where torch-fidelity's standard download lands (the torch hub checkpoint cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def _download_inception(dest: str, timeout: float = 10.0) -> None:
    """torch-fidelity's standard weights to ``dest``; InceptionWeightsError when offline."""
    try:
        probe = urllib.request.Request(URL_INCEPTION_V3, method="HEAD")
        urllib.request.urlopen(probe, timeout=timeout).close()
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        hash_prefix = os.path.basename(dest).rsplit("-", 1)[-1].split(".")[0]
        torch.hub.download_url_to_file(URL_INCEPTION_V3, dest, hash_prefix, progress=False)
    except Exception as e:  # URLError, timeouts, hash mismatch: all mean "no weights"
        raise InceptionWeightsError(
            f"no Inception weights: none were given and the standard download from "
            f"{URL_INCEPTION_V3} failed ({type(e).__name__}: {e}). Offline, set the weights "
            "path/URL (evaluate.inception_weights or --inception-weights) to a copy of that "
            "file, or evaluate with the domain extractor (extractors: [domain], trained by "
            "`python -m pipelines.features`)"
        ) from e


def _check_inception_weights(local: str, source: str) -> None:
    """Raise InceptionWeightsError unless ``local`` loads into torch-fidelity's InceptionV3."""
    where = source if source == local else f"{source} (local copy {local})"
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(
            f"Inception weights {where} are not a readable PyTorch state dict "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise InceptionWeightsError(
            f"Inception weights {where} hold a {type(state).__name__}, not a state dict of tensors"
        )
    try:
        FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=local)
    except RuntimeError as e:
        raise InceptionWeightsError(
            f"Inception weights {where} do not fit torch-fidelity's InceptionV3 "
            f"({str(e).splitlines()[0]} ...); expected the file from {URL_INCEPTION_V3}"
        ) from e


_checked: dict[tuple, bool] = {}


def resolve_inception_weights(
    weights: str | None = None, cache_dir: str | None = None, *, download: bool = True
) -> str:
    """A verified local path of the InceptionV3 weights.

    ``weights``: a local path or any fsspec URL (``file://``, ``s3://``, ``memory://``,
    ``https://``...); remote files are copied into ``cache_dir`` (default
    :func:`default_weights_cache`). None: torch-fidelity's standard file from the torch hub
    cache, downloaded first if ``download`` and the network answers. Anything missing or
    not InceptionV3 raises :class:`InceptionWeightsError` naming it.
    """
    if weights is None:
        local = source = _hub_inception_path()
        if not os.path.exists(local):
            if not download:
                raise InceptionWeightsError(
                    f"no Inception weights: none were given, {local} does not exist and "
                    "downloading is off; set the weights path/URL or use the domain extractor"
                )
            _download_inception(local)
    else:
        source = str(weights)
        try:
            if cio.is_local(source):
                local = source.removeprefix("file://")
                if not os.path.isfile(local):
                    raise FileNotFoundError(local)
            else:
                local = _cached_copy(source, cache_dir or default_weights_cache())
        except FileNotFoundError as e:
            raise InceptionWeightsError(f"Inception weights file {source} does not exist") from e
        except OSError as e:
            raise InceptionWeightsError(
                f"cannot read Inception weights {source} ({type(e).__name__}: {e})"
            ) from e
    stat = os.stat(local)
    key = (os.path.abspath(local), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        _check_inception_weights(local, source)
        _checked[key] = True
    return local


def inception_extractor(
    weights: str | None = None,
    cache_dir: str | None = None,
    *,
    download: bool = True,
    layer: str | None = None,
) -> Extractor:
    """torch-fidelity's InceptionV3 with weights from :func:`resolve_inception_weights`.

    ``layer``: one of torch-fidelity's '64', '192', '768', '2048' (the standard, default),
    'logits_unbiased', 'logits'; a non-default layer is named in the result keys. (FID on
    2048 features spends seconds to a minute of CPU in one 2048x2048 eigendecomposition.)
    """
    if layer is not None and layer not in FeatureExtractorInceptionV3.get_provided_features_list():
        raise ValueError(f"InceptionV3 has no feature layer {layer!r}")
    local = resolve_inception_weights(weights, cache_dir, download=download)
    return Extractor(INCEPTION, local, 3, layer)


EXTRACTORS = SCORE_EXTRACTORS
assert EXTRACTORS == (DOMAIN, INCEPTION)


def make_extractor(
    kind: str,
    *,
    features: str | None = None,
    inception_weights: str | None = None,
    download: bool = True,
) -> Extractor:
    """The extractor of ``kind``: ``domain`` (the features stage's CNN, weights file
    ``features``) or ``inception-v3-compat`` (weights from ``inception_weights``, else the
    standard download when ``download``)."""
    if kind == INCEPTION:
        return inception_extractor(inception_weights, download=download)
    if kind == DOMAIN:
        if not features:
            raise FeatureError(
                "the domain extractor needs its weights file (written by `python -m "
                "pipelines.features`)"
            )
        return domain_extractor(features)
    raise ValueError(f"unknown feature extractor {kind!r}; choose from {EXTRACTORS}")


@dataclass
class Extractors:
    """The feature spaces that FID/KID are measured in."""

    extractors: list[str] = field(default_factory=lambda: [DOMAIN])
    """Feature extractors: ``domain`` (the features stage's CNN) and/or
    ``inception-v3-compat``."""
    features: str | None = "models/features.pt"
    """Weights of the domain extractor (pipelines.features output)."""
    inception_weights: str | None = None
    """InceptionV3 weights, path or fsspec URL; null: torch-fidelity's standard download."""
    inception_download: bool = True
    """With no inception_weights: allow the standard download when the network answers."""

    def make(self) -> list[Extractor]:
        """Every configured extractor, its weights resolved and checked."""
        return [
            make_extractor(
                e,
                features=self.features,
                inception_weights=self.inception_weights,
                download=self.inception_download,
            )
            for e in self.extractors
        ]


# --- metrics ------------------------------------------------------------------------------


class ImageArray(Dataset):
    """uint8 images [N, C, H, W] (numpy, memory maps included) as torch-fidelity input;
    1-channel images are repeated to ``channels``."""

    def __init__(self, images: np.ndarray, channels: int | None = None):
        self.images, self.channels = images, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.images[i]))  # [C, H, W] uint8, a writable copy
        if self.channels and x.shape[0] == 1 and self.channels != 1:
            x = x.expand(self.channels, -1, -1).contiguous()
        return x


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    """``images`` if uint8 [N, C, H, W] with N >= 2, else a ValueError naming ``what``."""
    a = images if isinstance(images, np.ndarray) else np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(
            f"{what}: metrics take uint8 [N, C, H, W] images in [0, 255], got {a.dtype} "
            f"{a.shape} (cfebm.sampling.to_uint8 converts samples; round float data)"
        )
    if len(a) < 2:
        raise ValueError(f"{what}: need at least 2 images, got {len(a)}")
    return a


def compute_metrics(
    samples: np.ndarray,
    reference: np.ndarray,
    extractor: Extractor,
    cfg: MetricsConfig | None = None,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """FID / KID / precision-recall of ``samples`` against ``reference`` (both uint8 NCHW of
    the same shape per image) in ``extractor``'s feature space; keys
    ``<metric>_<extractor.label>``.

    Precision is the share of samples inside the reference manifold, recall the share of
    reference images inside the samples' (torch-fidelity: input1 = generated).
    """
    cfg = cfg or MetricsConfig()
    samples, reference = check_images(samples, "samples"), check_images(reference, "reference")
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"samples {samples.shape[1:]} and reference {reference.shape[1:]} differ in "
            "channels or size"
        )
    n = min(len(samples), len(reference))
    if cfg.prc and n <= cfg.prc_neighborhood:
        raise ValueError(f"precision/recall need more than {cfg.prc_neighborhood} images, got {n}")
    use_cuda = torch.device(device).type == "cuda"
    result = torch_fidelity.calculate_metrics(
        input1=ImageArray(samples, extractor.channels),
        input2=ImageArray(reference, extractor.channels),
        feature_extractor=extractor.name,
        feature_extractor_weights_path=extractor.weights_path,
        feature_layer_fid=extractor.layer,
        feature_layer_kid=extractor.layer,
        feature_layer_prc=extractor.layer,
        fid=cfg.fid,
        kid=cfg.kid,
        prc=cfg.prc,
        batch_size=cfg.batch_size,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=min(cfg.kid_subset_size, n),
        prc_neighborhood=cfg.prc_neighborhood,
        rng_seed=cfg.seed,
        cuda=use_cuda,
        cache=False,  # never read features/statistics of other arrays from disk
        save_cpu_ram=True,  # no DataLoader worker processes: the arrays are in memory
        verbose=False,
    )
    return {
        metric_key(_FIDELITY_KEYS[k], extractor.label): float(v)
        for k, v in result.items()
        if k in _FIDELITY_KEYS
    }


def settings(cfg: MetricsConfig, extractor: Extractor, n_samples: int, n_reference: int) -> dict:
    """The settings a result was computed with, for logs and run records."""
    return {
        **asdict(cfg),
        "kid_subset_size": min(cfg.kid_subset_size, n_samples, n_reference),
        "extractor": extractor.label,
    }
