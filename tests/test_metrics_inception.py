"""The Inception code path, offline: a weights file of torch-fidelity's own InceptionV3
architecture with random weights, made here, loaded from a path and from fsspec URLs; and
clear errors for missing, corrupt, foreign or undownloadable weights."""

import io

import fsspec
import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from cfebm import metrics
from cfebm.metrics import (
    INCEPTION,
    InceptionWeightsError,
    MetricsConfig,
    compute_metrics,
    inception_extractor,
    metric_key,
    resolve_inception_weights,
)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A state dict of torch-fidelity's InceptionV3 with random (variance-preserving)
    weights, so that features are neither zero nor infinite."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    finally:
        mp.undo()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fid_with_inception_from_a_file_url(inception_weights, one_thread):
    """1-channel 8x8 images go in: repeated to RGB, resized to 299 inside torch-fidelity.

    The 64-feature layer keeps this fast (FID on the 2048 features spends up to a minute of
    CPU in one eigendecomposition); the key says which layer it was.
    """
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)
    y = (x // 4).astype(np.uint8)  # much darker
    extractor = inception_extractor(f"file://{inception_weights}", layer="64")
    assert extractor.name == INCEPTION and extractor.weights_path == inception_weights
    same = compute_metrics(x, x, extractor, MetricsConfig(prc=False))
    other = compute_metrics(y, x, extractor, MetricsConfig(prc=False))
    fid = metric_key("fid", "inception-v3-compat-64")
    assert set(same) == {fid, metric_key("kid_mean", extractor.label), "kid_std_" + extractor.label}
    assert other[fid] > 0
    assert abs(same[fid]) < 1e-6 * other[fid]
    assert other["kid_mean_inception-v3-compat-64"] > same["kid_mean_inception-v3-compat-64"]
    standard = compute_metrics(
        x, y, inception_extractor(inception_weights), MetricsConfig(fid=False)
    )
    assert standard["kid_mean_inception-v3-compat"] > 0  # the 2048 features, plain name


def test_remote_weights_are_cached_and_refetched_when_replaced(inception_weights, tmp_path):
    url = "memory://cfebm-inception-test/weights.pth"
    fs = fsspec.filesystem("memory")
    fs.pipe(url, b"corrupt")
    with pytest.raises(InceptionWeightsError, match="weights.pth .*not a readable PyTorch"):
        resolve_inception_weights(url, cache_dir=str(tmp_path))
    with open(inception_weights, "rb") as f:
        fs.pipe(url, f.read())
    local = resolve_inception_weights(url, cache_dir=str(tmp_path))  # not the stale copy
    assert local.startswith(str(tmp_path))
    with open(local, "rb") as a, open(inception_weights, "rb") as b:
        assert a.read() == b.read()
    fs.rm(url)


def test_missing_corrupt_and_foreign_weights_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(InceptionWeightsError, match=f"{missing} does not exist"):
        inception_extractor(str(missing))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(InceptionWeightsError, match="corrupt.pth are not a readable PyTorch"):
        inception_extractor(str(corrupt))
    foreign = tmp_path / "resnet.pth"
    buf = io.BytesIO()
    torch.save(nn.Linear(3, 4).state_dict(), buf)
    foreign.write_bytes(buf.getvalue())
    with pytest.raises(InceptionWeightsError, match="resnet.pth do not fit torch-fidelity's"):
        inception_extractor(str(foreign))


def test_no_weights_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with pytest.raises(InceptionWeightsError, match="downloading is off.*domain extractor"):
        inception_extractor(None, download=False)
    # a download that cannot work: nothing listens on the discard port
    monkeypatch.setattr(metrics, "URL_INCEPTION_V3", "http://127.0.0.1:9/w-6726825d.pth")
    with pytest.raises(InceptionWeightsError, match="download .* failed.*inception_weights"):
        inception_extractor(None)
