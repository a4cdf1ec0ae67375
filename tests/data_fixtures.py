"""Builders of small, real-format inputs for the data tests (CIFAR archives, image folders)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
from PIL import Image

CIFAR_DIR = "cifar-10-batches-py"


def cifar_batch(rng: np.random.Generator, n: int, n_classes: int = 10) -> dict:
    """A batch dict as the CIFAR-10 python release has it (bytes keys, list labels)."""
    return {
        b"batch_label": b"testing batch",
        b"labels": [int(v) for v in rng.integers(0, n_classes, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar_archive(
    path: str,
    train: list[dict],
    test: dict | None,
    label_names: list[str] | None = None,
    protocol: int = 2,
) -> None:
    """``cifar-10-python.tar.gz`` layout: data_batch_1.., test_batch, batches.meta (pickles)."""
    with tarfile.open(path, "w:gz") as tar:
        if label_names is not None:
            meta = {b"label_names": [n.encode() for n in label_names], b"num_vis": 3072}
            add_bytes(tar, f"{CIFAR_DIR}/batches.meta", pickle.dumps(meta, protocol=protocol))
        if test is not None:  # out of order on purpose: readers must not rely on it
            add_bytes(tar, f"{CIFAR_DIR}/test_batch", pickle.dumps(test, protocol=protocol))
        for i, batch in enumerate(train, start=1):
            add_bytes(tar, f"{CIFAR_DIR}/data_batch_{i}", pickle.dumps(batch, protocol=protocol))
        add_bytes(tar, f"{CIFAR_DIR}/readme.html", b"<html></html>")


def cifar_images(batch: dict) -> np.ndarray:
    """The reference NCHW decoding of a batch: R, G, B planes of 32x32 row-major."""
    return batch[b"data"].reshape(-1, 3, 32, 32)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def good_images() -> dict[str, tuple[bytes, tuple[int, int, int], int]]:
    """Relative path -> (file bytes, the RGB colour it must come out as, tolerance).

    Every image is a single colour after centre-cropping, so the expected output is known
    exactly whatever the resize filter.
    """
    wide = Image.new("RGB", (60, 20), RED)  # left third red, centre green, right blue
    wide.paste(GREEN, (20, 0, 40, 20))
    wide.paste(BLUE, (40, 0, 60, 20))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    transparent = Image.new("P", (16, 16), 1)
    transparent.putpalette([0, 0, 0, 50, 60, 70] + [0, 0, 0] * 254)
    rgba = Image.new("RGBA", (12, 12), (0, 0, 255, 0))  # fully transparent blue -> white
    gray16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    return {
        "top.png": (encode(Image.new("RGB", (20, 20), (200, 100, 50)), "PNG"), (200, 100, 50), 0),
        "a/b/c/deep.png": (encode(wide, "PNG"), GREEN, 0),
        "a/photo.JPG": (
            encode(Image.new("RGB", (30, 24), (40, 90, 160)), "JPEG"),
            (40, 90, 160),
            6,
        ),
        "a/b/lossless.webp": (
            encode(Image.new("RGB", (16, 16), (7, 8, 9)), "WEBP", lossless=True),
            (7, 8, 9),
            0,
        ),
        "a/anim.gif": (encode(palette, "GIF"), (10, 200, 30), 0),
        "gray.png": (encode(Image.new("L", (10, 10), 100), "PNG"), (100, 100, 100), 0),
        "palette_t.png": (encode(transparent, "PNG", transparency=0), (50, 60, 70), 0),
        "alpha.png": (encode(rgba, "PNG"), (255, 255, 255), 0),
        "cmyk.jpg": (encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), RED, 6),
        "gray16.png": (encode(gray16, "PNG"), (255, 255, 255), 0),
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    """Relative path -> (file bytes, a phrase the error for it must contain)."""
    png = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    jpeg = encode(noisy, "JPEG")
    return {
        "b/truncated.png": (png[: len(png) // 2], "corrupt or truncated"),
        "b/zero.png": (b"", "empty file"),
        "notes.png": (b"not an image at all\n", "not an image"),
        "b/c/cut.jpg": (jpeg[: len(jpeg) // 3], "corrupt or truncated"),
    }


def write_folder(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        write(os.path.join(root, rel), data)
