"""The data stages against S3: a moto server over HTTP, real s3fs, nothing patched."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_fixtures import cifar_batch, cifar_images, good_images, write_cifar_archive, write_folder

from cfebm.data import DataError, PrepareConfig, PyramidConfig, PyramidStore, build_pyramid, prepare
from cfebm.data import writer as writer_module

pytestmark = pytest.mark.slow  # starts a local S3 server


@pytest.fixture
def s3fs_(s3_env):
    import s3fs

    return s3fs.S3FileSystem()


def test_folder_on_s3_to_pyramid_on_s3_and_back(s3_env, s3fs_, tmp_path):
    files = {rel: data for rel, (data, _, _) in good_images().items()}
    write_folder(tmp_path / "raw", files)
    s3fs_.put(str(tmp_path / "raw"), f"{s3_env[5:]}/raw", recursive=True)
    config = dict(source="folder", resolution=8, test_fraction=0.3, shard_size=3)

    prepare(PrepareConfig(url=f"{s3_env}/raw", out=f"{s3_env}/prepared", **config))
    build_pyramid(PyramidConfig(input=f"{s3_env}/prepared", out=f"{s3_env}/pyramid"))
    cache = tmp_path / "cache"
    remote = PyramidStore(f"{s3_env}/pyramid", cache_dir=str(cache))

    prepare(PrepareConfig(url=str(tmp_path / "raw"), out=str(tmp_path / "p"), **config))
    build_pyramid(PyramidConfig(input=str(tmp_path / "p"), out=str(tmp_path / "q")))
    local = PyramidStore(str(tmp_path / "q"))

    assert remote.resolutions == local.resolutions == [4, 8]
    assert remote.manifest["files"] == local.manifest["files"]  # byte-identical shards
    for split in ("train", "test"):
        assert remote.count(split) == local.count(split) > 0
        for r in (4, 8):
            assert np.array_equal(remote.read(split, r), local.read(split, r))
    assert remote.shard_urls("train", 8)[0] == f"{s3_env}/pyramid/train/r8/images-00000.npy"

    # Shards are cached by checksum: once read they no longer need the bucket.
    assert len(list(cache.rglob("*.npy"))) == len(remote.manifest["files"])
    s3fs_.rm(f"{s3_env[5:]}/pyramid/train", recursive=True)
    again = PyramidStore(f"{s3_env}/pyramid", cache_dir=str(cache))
    assert isinstance(again.read("train", 8, [0]), np.memmap)


def test_cifar_archive_on_s3(s3_env, s3fs_, tmp_path):
    rng = np.random.default_rng(0)
    train, test = [cifar_batch(rng, 6)], cifar_batch(rng, 3)
    write_cifar_archive(str(tmp_path / "c.tar.gz"), train, test, label_names=list("abcdefghij"))
    s3fs_.put(str(tmp_path / "c.tar.gz"), f"{s3_env[5:]}/archives/c.tar.gz")
    url = f"{s3_env}/archives/c.tar.gz"
    prepare(PrepareConfig(source="cifar10", url=url, resolution=32, out=f"{s3_env}/cifar"))
    store = PyramidStore(f"{s3_env}/cifar", cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(store.read("train", 32), cifar_images(train[0]))
    assert np.array_equal(store.read("test", 32), cifar_images(test))
    with pytest.raises(DataError, match=f"no such file or directory: {s3_env}/archives/none"):
        prepare(PrepareConfig(source="cifar10", url=f"{s3_env}/archives/none.tar.gz", out="x"))


def test_interrupted_write_on_s3_leaves_no_manifest(s3_env, s3fs_, tmp_path, monkeypatch):
    prepared, out = f"{s3_env}/prepared", f"{s3_env}/pyramid"
    prepare(PrepareConfig(source="shapes", num_train=12, num_test=4, shard_size=4, out=prepared))
    build_pyramid(PyramidConfig(input=prepared, out=out))  # an old, complete root
    original, calls = writer_module.DatasetWriter.write_array, []

    def write_array(self, relpath, array):
        calls.append(relpath)
        if len(calls) > 5:
            raise ConnectionError("simulated network failure")
        original(self, relpath, array)

    monkeypatch.setattr(writer_module.DatasetWriter, "write_array", write_array)
    with pytest.raises(ConnectionError):
        build_pyramid(PyramidConfig(input=prepared, out=out, coarsest=8))
    s3fs_.invalidate_cache()
    assert not s3fs_.exists(f"{out[5:]}/manifest.json")
    with pytest.raises(DataError, match=f"no complete dataset at {out}"):
        PyramidStore(out)


def test_corrupt_remote_shard_fails_its_checksum(s3_env, s3fs_, tmp_path):
    out = f"{s3_env}/prepared"
    prepare(PrepareConfig(source="shapes", num_train=4, num_test=0, out=out))
    s3fs_.pipe(f"{out[5:]}/train/r16/images-00000.npy", b"tampered")
    store = PyramidStore(out, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="does not match its checksum"):
        store.read("train", 16)


def test_missing_credentials_is_a_clear_error(s3_env, s3fs_, tmp_path, monkeypatch):
    import s3fs

    out = f"{s3_env}/prepared"
    prepare(PrepareConfig(source="shapes", num_train=4, num_test=0, out=out))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(DataError, match=f"{out}: no credentials.*AWS_ACCESS_KEY_ID"):
        PyramidStore(out)
    with pytest.raises(DataError, match=f"{s3_env}/raw: no credentials"):
        prepare(PrepareConfig(source="folder", url=f"{s3_env}/raw", out=str(tmp_path / "o")))
    # The same credentials given as storage options work without the environment.
    secret = {"key": "testing", "secret": "testing"}
    store = PyramidStore(out, storage_options=secret, cache_dir=str(tmp_path / "cache"))
    assert store.read("train", 16).shape == (4, 3, 16, 16)
    assert os.environ.get("AWS_ACCESS_KEY_ID") is None
