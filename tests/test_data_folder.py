"""The ``folder`` source: formats, modes, nesting, centre crop and every kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import bad_files, good_images, write_folder

from cfebm.data import DataError, PrepareConfig, PyramidStore, prepare


def run(root, out, **overrides) -> PyramidStore:
    config = dict(source="folder", url=str(root), out=str(out), resolution=8, test_fraction=0.0)
    prepare(PrepareConfig(**{**config, **overrides}))
    return PyramidStore(str(out))


def by_colour(images: np.ndarray) -> list[tuple[int, ...]]:
    """The single colour of each image (all images in these tests are uniform)."""
    return [tuple(int(v) for v in img.reshape(img.shape[0], -1).mean(axis=1)) for img in images]


def test_reads_every_format_mode_and_depth(tmp_path):
    good = good_images()
    write_folder(tmp_path / "in", {rel: data for rel, (data, _, _) in good.items()})
    write_folder(tmp_path / "in", {".DS_Store": b"\0junk", ".hidden/x.png": b"junk"})
    store = run(tmp_path / "in", tmp_path / "out")

    images = store.read("train", 8)
    assert images.shape == (len(good), 3, 8, 8) and images.dtype == np.uint8
    assert store.manifest["skipped"] == [] and store.count("test") == 0
    # Each uniform input must come out uniform and in its expected colour (centre crop of
    # the 60x20 strip is pure green; alpha composites over white; CMYK/16-bit converted).
    spread = np.ptp(images.reshape(len(images), 3, -1), axis=2).max(axis=1)
    assert spread.max() <= 2
    got = sorted(by_colour(images))
    want = sorted(colour for _, colour, _ in good.values())
    tolerance = max(tol for _, _, tol in good.values())
    for g, w in zip(got, want):
        assert np.abs(np.subtract(g, w)).max() <= tolerance, (got, want)


def test_grayscale_output_uses_luma(tmp_path):
    good = good_images()
    write_folder(tmp_path / "in", {"gray.png": good["gray.png"][0], "red.png": good["top.png"][0]})
    images = run(tmp_path / "in", tmp_path / "out", channels=1).read("train", 8)
    assert images.shape == (2, 1, 8, 8)
    values = sorted(int(v) for v in images.reshape(2, -1).mean(axis=1))
    # L = 0.299 R + 0.587 G + 0.114 B: (200, 100, 50) -> 124.2; gray 100 stays 100.
    assert values == [100, 124]


@pytest.mark.parametrize("rel", sorted(bad_files()))
def test_bad_file_is_a_clear_error_naming_it(tmp_path, rel):
    data, phrase = bad_files()[rel]
    write_folder(tmp_path / "in", {"ok.png": good_images()["top.png"][0], rel: data})
    with pytest.raises(DataError, match=phrase) as info:
        run(tmp_path / "in", tmp_path / "out")
    assert rel.split("/")[-1] in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing that looks like a dataset


def test_skip_corrupt_records_and_counts(tmp_path):
    good, bad = good_images(), bad_files()
    write_folder(tmp_path / "in", {rel: data for rel, (data, _, _) in good.items()})
    write_folder(tmp_path / "in", {rel: data for rel, (data, _) in bad.items()})
    store = run(tmp_path / "in", tmp_path / "out", skip_corrupt=True, test_fraction=0.25)

    assert store.count("train") + store.count("test") == len(good)
    assert store.manifest["skipped_count"] == len(bad)
    skipped = {item["file"].split("/in/")[-1]: item["reason"] for item in store.manifest["skipped"]}
    assert set(skipped) == set(bad)
    for rel, (_, phrase) in bad.items():
        assert phrase in skipped[rel]


def test_split_is_deterministic_and_disjoint(tmp_path):
    files = {f"d{i % 3}/img{i:02d}.png": _solid_png(i) for i in range(20)}
    write_folder(tmp_path / "in", files)
    a = run(tmp_path / "in", tmp_path / "a", test_fraction=0.25, seed=1)
    b = run(tmp_path / "in", tmp_path / "b", test_fraction=0.25, seed=1)
    c = run(tmp_path / "in", tmp_path / "c", test_fraction=0.25, seed=2)
    assert (a.count("train"), a.count("test")) == (15, 5)
    for split in ("train", "test"):
        assert np.array_equal(a.read(split, 8), b.read(split, 8))
    ids = lambda s, split: {int(v) for v in s.read(split, 8)[:, 0, 0, 0]}  # noqa: E731
    assert ids(a, "train").isdisjoint(ids(a, "test"))
    assert ids(a, "train") | ids(a, "test") == set(range(20))
    assert ids(a, "test") != ids(c, "test")


def test_folder_labels_follow_first_level_dirs(tmp_path):
    files = {
        f"{cls}/sub/img{i}.png": _solid_png(10 * k + i)
        for k, cls in enumerate("ba")
        for i in range(3)
    }
    write_folder(tmp_path / "in", files)
    store = run(tmp_path / "in", tmp_path / "out", folder_labels=True)
    assert store.label_names == ["a", "b"]
    ids = store.read("train", 8)[:, 0, 0, 0].astype(int)
    labels = store.labels("train")
    assert {(int(i), int(y)) for i, y in zip(ids, labels)} == {
        (0, 1),
        (1, 1),
        (2, 1),
        (10, 0),
        (11, 0),
        (12, 0),
    }


def test_loose_file_with_folder_labels_is_an_error(tmp_path):
    write_folder(tmp_path / "in", {"cls/a.png": _solid_png(1), "loose.png": _solid_png(2)})
    with pytest.raises(DataError, match="loose.png"):
        run(tmp_path / "in", tmp_path / "out", folder_labels=True)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no files under"):
        run(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="no such folder.*nowhere"):
        run(tmp_path / "nowhere", tmp_path / "out")
    write_folder(tmp_path / "f", {"x.png": _solid_png(1)})
    with pytest.raises(DataError, match="is a file"):
        run(tmp_path / "f" / "x.png", tmp_path / "out")


def test_all_files_bad_is_an_error_even_when_skipping(tmp_path):
    write_folder(tmp_path / "in", {"a.jpg": b"text", "b.png": b""})
    with pytest.raises(DataError, match="no images; 2 skipped"):
        run(tmp_path / "in", tmp_path / "out", skip_corrupt=True)


def _solid_png(value: int) -> bytes:
    from data_fixtures import encode
    from PIL import Image

    return encode(Image.new("RGB", (9, 13), (value, value, value)), "PNG")


def test_files_that_are_not_images_are_left_out_and_listed(tmp_path):
    good = good_images()
    write_folder(tmp_path / "in", {rel: data for rel, (data, _, _) in good.items()})
    write_folder(tmp_path / "in", {"README.md": b"# my photos", "a/meta.json": b"{}"})
    store = run(tmp_path / "in", tmp_path / "out")
    assert store.count("train") == len(good)
    assert sorted(store.manifest["ignored"]) == ["README.md", "a/meta.json"]
    write_folder(tmp_path / "docs", {"README.md": b"# nothing else"})
    with pytest.raises(DataError, match="no image files under .*README.md"):
        run(tmp_path / "docs", tmp_path / "out2")


def test_every_unreadable_image_is_named_in_one_error(tmp_path):
    bad = bad_files()
    write_folder(tmp_path / "in", {"ok.png": good_images()["top.png"][0]})
    write_folder(tmp_path / "in", {rel: data for rel, (data, _) in bad.items()})
    with pytest.raises(DataError, match=f"{len(bad)} file\\(s\\) of .* cannot be read") as info:
        run(tmp_path / "in", tmp_path / "out", test_fraction=0.5)  # both splits have some
    for rel, (_, phrase) in bad.items():
        assert rel in str(info.value) and phrase in str(info.value)
    assert "skip_corrupt" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_upsampling_is_said_and_recorded(tmp_path):
    lines = []
    prepare(PrepareConfig(source="digits", out=str(tmp_path / "d16"), resolution=16), lines.append)
    assert any("1797 of 1797 images are smaller than 16x16" in line for line in lines)
    assert PyramidStore(str(tmp_path / "d16")).manifest["upsampled"] == 1797
    lines.clear()
    prepare(PrepareConfig(source="digits", out=str(tmp_path / "d8"), resolution=8), lines.append)
    assert not any("upsampled" in line for line in lines)
