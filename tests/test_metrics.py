"""FID / KID / precision-recall through torch-fidelity with the domain feature extractor.

One small extractor, trained once on 8x8 digits, serves every test: the invariants (FID of
a set with itself, batch-size independence), the monotone response to blur and noise, the
separation of real digits from noise, and the naming of metric keys.
"""

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfebm.data import PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare
from cfebm.features import (
    FeatureError,
    FeatureTrainConfig,
    LabelledImages,
    accuracy,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from cfebm.metrics import (
    MetricsConfig,
    compute_metrics,
    domain_extractor,
    metric_key,
    split_key,
)

NAME = "cfebm-digits-cnn"
FAST = MetricsConfig(kid_subsets=20, kid_subset_size=300)
MLFLOW_NAME = re.compile(r"^[\w\-./ ]+$")  # MLflow's rule for metric names


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions run much faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    prepare(PrepareConfig(source="digits", out=str(root / "prepared"), resolution=8))
    build_pyramid(PyramidConfig(input=str(root / "prepared"), out=str(root / "pyr"), coarsest=4))
    return PyramidStore(str(root / "pyr"))


TINY = FeatureTrainConfig(epochs=8, batch_size=64, width=8, feature_dim=32, seed=0)


@pytest.fixture(scope="module")
def extractor(digits, tmp_path_factory):
    train = LabelledImages(
        {r: digits.read("train", r) for r in digits.resolutions}, digits.labels("train")
    )
    net = train_feature_net(train, TINY, [10])
    acc = accuracy(net, digits.read("test", 8), digits.labels("test"))[0]
    path = str(tmp_path_factory.mktemp("features") / "features.pt")
    save_feature_net(net, path, NAME, {"dataset": "digits", "test_accuracy": acc})
    return domain_extractor(path)


@pytest.fixture(scope="module")
def real(digits):
    """(train, test) uint8 digits at 8x8."""
    return np.asarray(digits.read("train", 8)), np.asarray(digits.read("test", 8))


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return images
    t = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = torch.from_numpy(np.array(images, dtype=np.float32))
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.transpose(-1, -2))
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def add_noise(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, std, images.shape)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


def test_trained_extractor_classifies_digits(extractor):
    loaded = load_feature_net(extractor.weights_path)
    assert loaded.name == NAME and loaded.meta["dataset"] == "digits"
    assert loaded.meta["test_accuracy"] > 0.7  # 10 classes: far above chance (0.1)


def test_metric_names_carry_the_extractor(extractor, real):
    train, test = real
    values = compute_metrics(test, train, extractor, FAST)
    prefixes = ("fid", "kid_mean", "kid_std", "precision", "recall", "f_score")
    assert set(values) == {metric_key(m, NAME) for m in prefixes}
    for key in values:
        assert split_key(key)[1] == NAME
        assert MLFLOW_NAME.match(key) and "inception" not in key


def test_fid_of_a_set_with_itself_is_zero(extractor, real):
    train, _ = real
    values = compute_metrics(train, train, extractor, FAST)
    assert abs(values[metric_key("fid", NAME)]) < 1e-6
    assert values[metric_key("precision", NAME)] == 1.0
    assert values[metric_key("recall", NAME)] == 1.0


def test_result_does_not_depend_on_batch_size(extractor, real):
    train, test = real
    a = compute_metrics(test, train, extractor, MetricsConfig(batch_size=7, kid_subsets=5))
    b = compute_metrics(test, train, extractor, MetricsConfig(batch_size=500, kid_subsets=5))
    assert a.keys() == b.keys()
    for k in a:
        # float32 features: convolution kernels chosen by batch size round differently
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k


def test_domain_extractor_separates_real_digits_from_noise(extractor, real):
    train, test = real
    noise = np.random.default_rng(1).integers(0, 256, test.shape, dtype=np.uint8)
    held_out = compute_metrics(test, train, extractor, FAST)
    uniform = compute_metrics(noise, train, extractor, FAST)
    fid, kid, recall = (metric_key(m, NAME) for m in ("fid", "kid_mean", "recall"))
    assert uniform[fid] > 20 * held_out[fid]
    assert uniform[kid] > 20 * max(held_out[kid], 1e-3)
    assert uniform[recall] < 0.05 < 0.7 < held_out[recall]  # noise covers no digit


@pytest.mark.parametrize(
    "degrade, levels",
    [(blur, [0.0, 0.6, 1.2, 2.5]), (add_noise, [0.0, 20.0, 50.0, 100.0])],
    ids=["blur", "noise"],
)
def test_fid_and_kid_grow_with_degradation(extractor, real, degrade, levels):
    train, test = real
    results = [compute_metrics(degrade(test, s), train, extractor, FAST) for s in levels]
    for m in ("fid", "kid_mean"):
        series = [r[metric_key(m, NAME)] for r in results]
        assert all(a < b for a, b in zip(series, series[1:])), (m, series)


def test_no_feature_cache_is_written(extractor, real, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    train, test = real
    first = compute_metrics(test[:100], train, extractor, MetricsConfig(kid_subsets=2))
    second = compute_metrics(test[100:200], train, extractor, MetricsConfig(kid_subsets=2))
    assert first != second
    assert not os.path.exists(tmp_path / "fidelity_cache")


def test_inputs_must_be_uint8_nchw(extractor, real):
    train, test = real
    with pytest.raises(ValueError, match="uint8"):
        compute_metrics(test.astype(np.float32), train, extractor)
    with pytest.raises(ValueError, match="differ"):
        compute_metrics(test[:, :, :4, :4], train, extractor)


def test_training_is_deterministic_and_leaves_global_rng_alone(digits):
    train = LabelledImages({8: digits.read("train", 8)[:128]}, digits.labels("train")[:128])
    cfg = FeatureTrainConfig(epochs=1, batch_size=32, width=4, feature_dim=8, seed=5)
    state = torch.get_rng_state()
    a = train_feature_net(train, cfg, [10]).state_dict()
    assert torch.equal(state, torch.get_rng_state())
    b = train_feature_net(train, cfg, [10]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_file_on_fsspec_url_and_bad_files(extractor, tmp_path):
    net = load_feature_net(extractor.weights_path).net
    save_feature_net(net, "memory://cfebm-test/features.pt", NAME, {"resolution": 8})
    loaded = load_feature_net("memory://cfebm-test/features.pt")
    assert loaded.meta == {"resolution": 8}
    assert torch.equal(loaded.net.feature_scale, net.feature_scale)
    with pytest.raises(FeatureError, match="missing.pt not found"):
        load_feature_net(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(FeatureError, match="junk.pt is not a readable PyTorch file"):
        load_feature_net(str(tmp_path / "junk.pt"))
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(FeatureError, match="not a cfebm feature extractor"):
        load_feature_net(str(tmp_path / "other.pt"))
    with pytest.raises(FeatureError, match="must be lower-case"):
        save_feature_net(net, str(tmp_path / "x.pt"), "fid_like_name")
