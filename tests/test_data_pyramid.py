"""Exact mean pooling, the shard-by-shard pyramid builder, the reader and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from cfebm.data import (
    DataError,
    PrepareConfig,
    PyramidConfig,
    PyramidStore,
    build_pyramid,
    mean_pool2x,
    prepare,
    shards_for_worker,
    to_unit_range,
)
from cfebm.data import writer as writer_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block_mean(x: np.ndarray, k: int) -> np.ndarray:
    """float64 reference: the mean of each k x k block over the last two axes."""
    *lead, h, w = x.shape
    return x.astype(np.float64).reshape(*lead, h // k, k, w // k, k).mean(axis=(-3, -1))


# --- pooling -----------------------------------------------------------------------------


def test_mean_pool2x_is_exact_on_uint8_for_seven_levels():
    x = np.random.default_rng(0).integers(0, 256, size=(2, 3, 128, 128), dtype=np.uint8)
    level = x
    for k in (2, 4, 8, 16, 32, 64, 128):
        level = mean_pool2x(level)
        assert level.dtype == np.float32
        assert np.array_equal(level.astype(np.float64), block_mean(x, k)), k


def test_two_levels_equal_a_4x4_mean_and_float_input_is_close():
    x = np.random.default_rng(1).integers(0, 256, size=(4, 1, 16, 8), dtype=np.uint8)
    assert np.array_equal(mean_pool2x(mean_pool2x(x)), block_mean(x, 4).astype(np.float32))
    y = np.random.default_rng(2).normal(size=(3, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(mean_pool2x(y), block_mean(y, 2), rtol=1e-6, atol=1e-7)


def test_mean_pool2x_rejects_odd_sizes():
    with pytest.raises(DataError, match="even height and width"):
        mean_pool2x(np.zeros((1, 1, 5, 4), np.uint8))


# --- building and reading ----------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path):
    url = str(tmp_path / "prepared")
    config = dict(source="shapes", num_train=23, num_test=6, resolution=16, shard_size=10)
    prepare(PrepareConfig(out=url, **config))
    return url


@pytest.fixture
def pyramid(prepared, tmp_path):
    url = str(tmp_path / "pyramid")
    build_pyramid(PyramidConfig(input=prepared, out=url, coarsest=4))
    return url


def test_prepared_root_has_one_level(prepared):
    store = PyramidStore(prepared)
    assert store.resolutions == [16]
    assert store.manifest["levels"] == {"16": {"dtype": "uint8", "shape": [3, 16, 16]}}
    assert store.shard_counts("train") == [10, 10, 3] and store.count("test") == 6


def test_pyramid_levels_are_pools_of_the_same_images(prepared, pyramid):
    source, store = PyramidStore(prepared), PyramidStore(pyramid)
    assert store.resolutions == [4, 8, 16] and store.channels == 3
    assert store.manifest["levels"]["16"]["dtype"] == "uint8"
    assert store.manifest["levels"]["8"]["dtype"] == "float32"
    assert store.manifest["levels"]["4"]["dtype"] == "float32"
    for split in ("train", "test"):
        assert store.num_shards(split) == source.num_shards(split)
        assert np.array_equal(store.labels(split), source.labels(split))
        for k in range(store.num_shards(split)):
            fine = source.read(split, 16, [k])
            assert np.array_equal(store.read(split, 16, [k]), fine)
            assert store.read(split, 16, [k]).dtype == np.uint8
            for r in (8, 4):
                level = store.read(split, r, [k])
                assert level.dtype == np.float32 and level.shape == (len(fine), 3, r, r)
                assert np.array_equal(level, block_mean(fine, 16 // r).astype(np.float32))


def test_manifest_checksums_match_files(pyramid):
    with open(os.path.join(pyramid, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "cfebm-pyramid/1"
    assert manifest["pyramid"]["coarsest"] == 4 and manifest["source"]["source"] == "shapes"
    on_disk = {
        os.path.relpath(os.path.join(d, f), pyramid)
        for d, _, files in os.walk(pyramid)
        for f in files
        if f != "manifest.json"
    }
    assert on_disk == set(manifest["files"])
    assert "train/r8/images-00002.npy" in on_disk and "test/labels-00000.npy" in on_disk
    for rel, sha in manifest["files"].items():
        with open(os.path.join(pyramid, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha


def test_reader_api(pyramid):
    store = PyramidStore(pyramid)
    one = store.read("train", 8, [1])
    assert isinstance(one, np.memmap) and not one.flags.writeable  # local: memory-mapped
    both = store.read("train", 8, [2, 0])
    assert np.array_equal(
        both, np.concatenate([store.read("train", 8, [2]), store.read("train", 8, [0])])
    )
    assert np.array_equal(
        store.labels("train", [2, 0]),
        np.concatenate([store.labels("train", [2]), store.labels("train", [0])]),
    )
    assert store.read("train", 4).shape == (23, 3, 4, 4)
    urls = store.shard_urls("test", 4)
    assert urls == [f"{pyramid}/test/r4/images-00000.npy"] and os.path.exists(urls[0])
    for call, phrase in [
        (lambda: store.read("valid", 8), "no split 'valid'"),
        (lambda: store.read("train", 32), "no resolution 32"),
        (lambda: store.read("train", 8, [3]), "asked for \\[3\\]"),
        (lambda: store.shard_urls("train", 2), "no resolution 2"),
    ]:
        with pytest.raises(DataError, match=phrase):
            call()


def test_missing_or_incomplete_root_names_the_url(pyramid, tmp_path):
    with pytest.raises(DataError, match=f"no complete dataset at {tmp_path}/nothing"):
        PyramidStore(str(tmp_path / "nothing"))
    os.remove(os.path.join(pyramid, "manifest.json"))
    with pytest.raises(DataError, match=f"{pyramid}: manifest.json is missing"):
        PyramidStore(pyramid)


def test_shards_for_worker_round_robin():
    assert shards_for_worker(7, 0, 3) == [0, 3, 6]
    assert shards_for_worker(7, 2, 3) == [2, 5]
    assert sorted(sum((shards_for_worker(10, r, 4) for r in range(4)), [])) == list(range(10))
    with pytest.raises(DataError, match="2 shard\\(s\\) for 3 workers"):
        shards_for_worker(2, 0, 3)
    with pytest.raises(DataError, match="rank 3"):
        shards_for_worker(8, 3, 3)


def test_to_unit_range(pyramid):
    x = np.array([0, 127.5, 255], dtype=np.float32)
    assert torch.equal(to_unit_range(x), torch.tensor([-1.0, 0.0, 1.0]))
    images = PyramidStore(pyramid).read("train", 16, [0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable numpy arrays
        t = to_unit_range(images)
    assert t.dtype == torch.float32 and t.shape == images.shape
    reference = torch.from_numpy(images.astype(np.float64) / 127.5 - 1)
    assert torch.allclose(t.double(), reference, rtol=0, atol=1e-6)


def test_bad_pyramid_parameters(prepared, tmp_path):
    with pytest.raises(DataError, match="pyramid.coarsest must be a power of two"):
        PyramidConfig(input=prepared, out=str(tmp_path / "p"), coarsest=6)
    with pytest.raises(DataError, match="pyramid.coarsest \\(32\\) is finer"):
        build_pyramid(PyramidConfig(input=prepared, out=str(tmp_path / "p"), coarsest=32))
    with pytest.raises(DataError, match="contains the input"):
        build_pyramid(PyramidConfig(input=prepared, out=prepared))


# --- atomic outputs ----------------------------------------------------------------------


def _fail_after(monkeypatch, n: int) -> None:
    """Make the n+1-th array write raise, like a crash in the middle of a stage."""
    original = writer_module.DatasetWriter.write_array
    calls = {"n": 0}

    def write_array(self, relpath, array):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt("simulated interruption")
        original(self, relpath, array)

    monkeypatch.setattr(writer_module.DatasetWriter, "write_array", write_array)


def test_interrupted_build_leaves_old_root_or_nothing(prepared, pyramid, tmp_path, monkeypatch):
    before = PyramidStore(pyramid).manifest
    _fail_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        build_pyramid(PyramidConfig(input=prepared, out=pyramid, coarsest=8))
    assert PyramidStore(pyramid).manifest == before  # the old, complete root is untouched
    fresh = str(tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        build_pyramid(PyramidConfig(input=prepared, out=fresh))
    assert not os.path.exists(fresh)
    assert sorted(os.listdir(tmp_path)) == ["prepared", "pyramid"]  # no temporary leftovers


def test_rebuild_replaces_the_root(prepared, pyramid):
    build_pyramid(PyramidConfig(input=prepared, out=pyramid, coarsest=8))
    store = PyramidStore(pyramid)
    assert store.resolutions == [8, 16]
    assert not os.path.exists(os.path.join(pyramid, "train", "r4"))


# --- the stage CLIs ----------------------------------------------------------------------


def _cli(stage: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", f"pipelines.{stage}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_params_file_and_overrides(tmp_path):
    params = {
        "prepare": {"source": "shapes", "num_train": 6, "num_test": 2, "out": "p", "resolution": 8},
        "pyramid": {"input": "p", "out": "q", "coarsest": 2},
        "train": {"unrelated": True},  # other stages' sections are not ours to read
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    done = _cli("prepare", "--num_train", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = _cli("pyramid", "--params", "params.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    store = PyramidStore(str(tmp_path / "q"))
    assert store.resolutions == [2, 4, 8] and store.count("train") == 4

    bad = _cli("pyramid", "--coarsest", "16", cwd=tmp_path)
    assert bad.returncode != 0 and "pyramid.coarsest (16) is finer" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = _cli("prepare", "--resolution", "24", "--out", "r", cwd=tmp_path)
    assert bad.returncode != 0 and "prepare.resolution must be a power of two" in bad.stderr
    helped = _cli("prepare", "--help", cwd=tmp_path)
    for option in ("--source", "--url", "--shard_size", "--skip_corrupt", "--storage_options"):
        assert option in helped.stdout
