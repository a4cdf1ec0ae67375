"""The built-in sources: digits, shapes (seeded, two domains) and CIFAR-10 archives."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
from data_fixtures import (
    CIFAR_DIR,
    add_bytes,
    cifar_batch,
    cifar_images,
    write_cifar_archive,
)

from cfebm.config import ConfigError, build_dataclass
from cfebm.data import DataError, PrepareConfig, PyramidStore, prepare
from cfebm.data.shapes import COLOURS, PALETTES, SHAPES


def run(tmp_path, name="out", **config) -> PyramidStore:
    prepare(PrepareConfig(out=str(tmp_path / name), **config))
    return PyramidStore(str(tmp_path / name))


# --- digits ------------------------------------------------------------------------------


def test_digits_shapes_labels_and_split(tmp_path):
    from sklearn.datasets import load_digits

    store = run(tmp_path, source="digits", test_fraction=0.25, shard_size=500)
    assert store.channels == 1 and store.resolutions == [16]
    assert (store.count("train"), store.count("test")) == (1348, 449)  # 1797 images
    assert store.num_shards("train") == 3 and store.shard_counts("train") == [500, 500, 348]
    train = store.read("train", 16)
    assert train.shape == (1348, 1, 16, 16) and train.dtype == np.uint8
    assert train.max() == 255 and train.min() == 0  # 0..16 scaled to the full 0..255
    labels = store.labels("train")
    assert labels.dtype == np.int64 and labels.shape == (1348,) and set(labels) == set(range(10))
    assert store.label_names == [str(d) for d in range(10)]

    # Labels travel with their images: each stored image, pooled back to 8x8, is closest to
    # the scikit-learn digit whose target is the stored label.
    digits = load_digits()
    reference = digits.images.reshape(len(digits.images), -1) * (255 / 16)
    for image, label in zip(train[:25], labels[:25]):
        pooled = image[0].astype(float).reshape(8, 2, 8, 2).mean(axis=(1, 3)).ravel()
        nearest = np.argmin(((reference - pooled) ** 2).sum(axis=1))
        assert digits.target[nearest] == label


def test_digits_split_depends_on_seed_only(tmp_path):
    a = run(tmp_path, "a", source="digits", seed=3)
    b = run(tmp_path, "b", source="digits", seed=3)
    c = run(tmp_path, "c", source="digits", seed=4, channels=3)
    assert np.array_equal(a.read("test", 16), b.read("test", 16))
    assert np.array_equal(a.labels("test"), b.labels("test"))
    assert not np.array_equal(a.labels("test"), c.labels("test"))
    rgb = c.read("train", 16)
    assert rgb.shape[1] == 3 and np.array_equal(rgb[:, 0], rgb[:, 2])


# --- shapes ------------------------------------------------------------------------------


def test_shapes_are_deterministic_by_seed(tmp_path):
    config = dict(source="shapes", num_train=40, num_test=10, resolution=16)
    a = run(tmp_path, "a", seed=7, **config)
    b = run(tmp_path, "b", seed=7, **config)
    c = run(tmp_path, "c", seed=8, **config)
    assert a.manifest["files"] == b.manifest["files"]  # byte-identical shards
    assert not np.array_equal(a.read("train", 16), c.read("train", 16))
    assert not np.array_equal(a.read("train", 16), a.read("test", 16)[:10].repeat(4, axis=0))
    x, y = a.read("train", 16), a.labels("train")
    assert x.shape == (40, 3, 16, 16) and y.shape == (40, 2)
    assert set(y[:, 0]) <= set(range(len(SHAPES))) and len(set(y[:, 0])) >= 3
    assert a.manifest["label_fields"] == ["shape", "colour"]
    assert a.label_names == [list(SHAPES), list(COLOURS)]
    assert x.std() > 20  # varied scenes, not blank images


def test_shape_domains_share_scenes_but_differ_in_colour(tmp_path):
    config = dict(source="shapes", num_train=64, num_test=0, resolution=16, seed=1)
    a = run(tmp_path, "a", domain="a", **config)
    b = run(tmp_path, "b", domain="b", **config)
    xa, xb = a.read("train", 16).astype(int), b.read("train", 16).astype(int)
    ya, yb = a.labels("train"), b.labels("train")
    assert np.array_equal(ya[:, 0], yb[:, 0])  # same shapes, scene by scene
    names = list(COLOURS)
    assert {names[i] for i in ya[:, 1]} <= set(PALETTES["a"])
    assert {names[i] for i in yb[:, 1]} <= set(PALETTES["b"])
    changed = (xa != xb).any(axis=1)  # [N, H, W]: object pixels; backgrounds are identical
    assert 0.05 < changed.mean() < 0.6
    red_minus_blue = lambda x: (x[:, 0] - x[:, 2])[changed].mean()  # noqa: E731
    assert red_minus_blue(xa) > 40 and red_minus_blue(xb) < -40


# --- cifar10 -----------------------------------------------------------------------------


@pytest.fixture
def cifar(tmp_path):
    rng = np.random.default_rng(0)
    train = [cifar_batch(rng, 7), cifar_batch(rng, 5)]
    test = cifar_batch(rng, 4)
    path = tmp_path / "cifar-10-python.tar.gz"
    names = ["airplane", "automobile", "bird", "cat", "deer"] + [f"c{i}" for i in range(5, 10)]
    write_cifar_archive(str(path), train, test, label_names=names)
    return path, train, test, names


def test_cifar_archive_train_and_test(tmp_path, cifar):
    path, train, test, names = cifar
    store = run(tmp_path, source="cifar10", url=str(path), resolution=32, shard_size=5)
    assert (store.count("train"), store.count("test")) == (12, 4)
    assert store.shard_counts("train") == [5, 5, 2]
    expected = np.concatenate([cifar_images(b) for b in train])
    assert np.array_equal(store.read("train", 32), expected)
    assert np.array_equal(store.read("test", 32), cifar_images(test))
    assert store.labels("train").tolist() == train[0][b"labels"] + train[1][b"labels"]
    assert store.label_names == names


def test_cifar_resized_grayscale_and_without_meta(tmp_path):
    rng = np.random.default_rng(1)
    train = [cifar_batch(rng, 3, n_classes=4)]
    path = tmp_path / "subset.tar.gz"
    write_cifar_archive(str(path), train, None, label_names=None, protocol=4)
    store = run(tmp_path, source="cifar10", url=str(path), resolution=16, channels=1)
    assert store.read("train", 16).shape == (3, 1, 16, 16)
    assert store.count("test") == 0 and store.read("test", 16).shape == (0, 1, 16, 16)
    n_classes = max(train[0][b"labels"]) + 1
    assert store.label_names == [f"class_{i}" for i in range(n_classes)]


def test_cifar_from_extracted_folder(tmp_path, cifar):
    path, train, test, _ = cifar
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    store = run(tmp_path, source="cifar10", url=str(tmp_path / "extracted"), resolution=32)
    assert np.array_equal(store.read("train", 32), np.concatenate([cifar_images(b) for b in train]))
    assert np.array_equal(store.read("test", 32), cifar_images(test))


def _tar_gz(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            add_bytes(tar, name, data)
    return str(path)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "kind, phrase",
    [
        ("not_cifar_tar", "holds no CIFAR-10 batches"),
        ("not_archive", "not a readable tar archive"),
        ("truncated", "not a readable tar archive"),
        ("empty", "empty file"),
        ("missing", "no such file"),
        ("bad_keys", "expected keys 'data' and 'labels'"),
        ("bad_shape", "must be uint8 \\[N, 3072\\]"),
        ("evil_pickle", "not allowed"),
    ],
)
def test_cifar_bad_input_is_a_clear_error(tmp_path, cifar, kind, phrase):
    path = tmp_path / f"{kind}.tar.gz"
    rng = np.random.default_rng(0)
    if kind == "not_cifar_tar":
        _tar_gz(path, {"photos/readme.txt": b"hello", "photos/a.png": b"x"})
    elif kind == "not_archive":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif kind == "truncated":
        data = cifar[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad_keys":
        _tar_gz(path, {f"{CIFAR_DIR}/data_batch_1": pickle.dumps({b"pixels": 1})})
    elif kind == "bad_shape":
        batch = {b"data": rng.integers(0, 255, (2, 100), np.uint8), b"labels": [0, 1]}
        _tar_gz(path, {f"{CIFAR_DIR}/data_batch_1": pickle.dumps(batch)})
    elif kind == "evil_pickle":
        _tar_gz(path, {f"{CIFAR_DIR}/data_batch_1": pickle.dumps(_Evil())})
    with pytest.raises(DataError, match=phrase) as info:
        run(tmp_path, source="cifar10", url=str(path))
    assert path.name in str(info.value)


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, phrase",
    [
        (dict(resolution=12), "prepare.resolution must be a power of two"),
        (dict(channels=2), "prepare.channels"),
        (dict(source="cifar10"), "prepare.url is required"),
        (dict(source="imagenet"), "prepare.source"),
        (dict(test_fraction=1.0), "prepare.test_fraction"),
        (dict(source="shapes", domain="c"), "prepare.domain"),
        (dict(shard_size=0), "prepare.shard_size"),
    ],
)
def test_bad_parameters_are_named(config, phrase):
    with pytest.raises(DataError, match=phrase):
        PrepareConfig(**config)


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError, match="resolutoin"):
        build_dataclass(PrepareConfig, {"resolutoin": 16}, "prepare")


def test_manifest_records_source_without_credentials(tmp_path):
    secret = {"key": "AKIA-TEST", "secret": "s3cr3t-value"}
    store = run(tmp_path, source="shapes", num_train=3, num_test=1, storage_options=secret)
    manifest = store.manifest
    assert manifest["format"] == "cfebm-pyramid/1" and manifest["source"]["source"] == "shapes"
    assert "storage_options" not in manifest["source"]
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert "s3cr3t-value" not in text and "AKIA-TEST" not in text
