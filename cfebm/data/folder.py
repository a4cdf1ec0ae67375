"""Source ``folder``: every image under a folder, at any depth, local or any fsspec URL.

JPEG, PNG, WebP and GIF (first frame) are read; grayscale, palette, RGBA/LA (composited
on white, since the colour of transparent pixels is undefined), CMYK and 16-bit images
are converted to the configured channels; EXIF orientation is applied; each image is
centre-cropped to a square and resized to the finest resolution. Hidden files and
folders (names starting with '.') are ignored, and so are files without an image
extension (a README, a ``.json`` sidecar), which are listed in ``Source.ignored``. A file
with an image extension that cannot be read is bad input: by default the stage stops with
one DataError that names every such file of the folder; with ``skip_corrupt`` they are
skipped and recorded in ``Source.skipped``.

Files are fetched and decoded by a few threads, a chunk at a time, so memory holds one
chunk of encoded files plus one shard of decoded images.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cfebm.data.errors import DataError
from cfebm.data.images import centre_square, resample_filter
from cfebm.data.source import Batch, Source, split_permutation
from cfebm.data.storage import filesystem, is_credentials_error, storage_errors, to_url

FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif")
"""Files read as images (case-insensitive); any other file is ignored and listed."""
FETCH_CHUNK = 64  # files in flight at once: bounds the encoded bytes held in memory
FETCH_THREADS = 8  # concurrent reads hide object-store latency; Pillow decodes without the GIL
_BACKGROUND = (255, 255, 255)


def load_folder_source(
    url: str,
    resolution: int,
    channels: int,
    test_fraction: float,
    seed: int,
    resample: str,
    skip_corrupt: bool,
    folder_labels: bool,
    storage_options: dict | None = None,
) -> Source:
    """Images under ``url`` split by a seeded permutation of their sorted paths.

    With ``folder_labels`` the first-level sub-folder names are the classes (sorted).
    """
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    found = list_files(fs, root, url)
    files = [p for p in found if p.lower().endswith(EXTENSIONS)]
    ignored = [p[len(root) + 1 :] for p in found if not p.lower().endswith(EXTENSIONS)]
    if not files:
        raise DataError(
            f"no image files under {url} ({len(ignored)} other file(s), e.g. "
            f"{ignored[:3]}; images end in {', '.join(EXTENSIONS)})"
        )
    rel = [p[len(root) + 1 :] for p in files]
    label_names = None
    labels = None
    if folder_labels:
        label_names, labels = _labels_from_dirs(rel, url)
    train, test = split_permutation(len(files), test_fraction, seed)
    source = Source(channels=channels, splits={}, label_names=label_names, ignored=ignored)
    decode = ImageDecoder(resolution, channels, resample)

    def load(path: str) -> np.ndarray | DataError:
        """Fetch and decode one file (in a worker thread); failures are returned, not raised."""
        name = to_url(fs, path)
        try:
            with storage_errors(name, "read"):
                data = fs.cat_file(path)
            return decode(data, name)
        except DataError as e:
            if is_credentials_error(e.__cause__):
                raise  # missing credentials are never a skippable bad image
            return e

    def batches(indices: np.ndarray) -> Iterator[Batch]:
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            for start in range(0, len(indices), FETCH_CHUNK):
                chunk = indices[start : start + FETCH_CHUNK]
                images, kept = [], []
                for i, result in zip(chunk, pool.map(load, [files[i] for i in chunk])):
                    if isinstance(result, DataError):  # all of them reported at the end
                        bad = source.skipped if skip_corrupt else source.errors
                        bad.append(_skip_record(to_url(fs, files[i]), result))
                    else:
                        image, small = result
                        source.upsampled += small
                        images.append(image)
                        kept.append(i)
                if images:
                    yield np.stack(images), (labels[kept] if labels is not None else None)

    source.splits = {"train": batches(train), "test": batches(test)}
    return source


def list_files(fs, root: str, url: str) -> list[str]:
    """Sorted paths of the non-hidden files under ``root``; DataError if none."""
    with storage_errors(url, "list"):
        if not fs.exists(root):
            raise DataError(f"prepare.url: no such folder: {url}")
        if not fs.isdir(root):
            raise DataError(f"prepare.url: {url} is a file; the folder source needs a folder")
        found = fs.find(root)
    files = sorted(p for p in found if not _hidden(p[len(root) + 1 :]))
    if not files:
        raise DataError(f"no files under {url} (hidden files are ignored)")
    return files


def _hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


def _labels_from_dirs(rel: list[str], url: str) -> tuple[list[str], np.ndarray]:
    top = [r.split("/", 1)[0] if "/" in r else None for r in rel]
    loose = [r for r, t in zip(rel, top) if t is None]
    if loose:
        raise DataError(
            f"prepare.folder_labels: {url}/{loose[0]} is not inside a class folder "
            f"({len(loose)} such file(s))"
        )
    names = sorted(set(top))
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[t] for t in top], dtype=np.int64)


def _skip_record(name: str, error: DataError) -> dict:
    return {"file": name, "reason": str(error).removeprefix(f"{name}: ")}


class ImageDecoder:
    """Decode one encoded image to uint8 [C, r, r]; every failure is a DataError naming it."""

    def __init__(self, resolution: int, channels: int, resample: str):
        self.resolution, self.channels = resolution, channels
        self.filter = resample_filter(resample)

    def __call__(self, data: bytes, name: str) -> tuple[np.ndarray, bool]:
        """(the image, whether it was smaller than the resolution and upsampled)."""
        if len(data) == 0:
            raise DataError(f"{name}: empty file (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise DataError(f"{name}: not an image (or not one Pillow can identify)") from e
        except Exception as e:  # e.g. DecompressionBombError for absurd dimensions
            raise DataError(f"{name}: cannot open image: {type(e).__name__}: {e}") from e
        if img.format not in FORMATS:
            raise DataError(f"{name}: unsupported format {img.format}; supported: {FORMATS}")
        try:
            return self._convert(img)
        except DataError as e:
            raise DataError(f"{name}: {e}") from e
        except Exception as e:  # Pillow's decoders raise many types on bad data
            raise DataError(f"{name}: corrupt or truncated {img.format}: {e}") from e

    def _convert(self, img: Image.Image) -> np.ndarray:
        r = self.resolution
        if img.format == "JPEG":
            img.draft(img.mode, (2 * r, 2 * r))  # decode big JPEGs at a reduced DCT scale
        img.load()
        img = ImageOps.exif_transpose(img)
        img = centre_square(_to_mode(img, "L" if self.channels == 1 else "RGB"))
        small = img.size[0] < r
        img = img.resize((r, r), self.filter)
        x = np.asarray(img, dtype=np.uint8)
        return (x[None] if x.ndim == 2 else x.transpose(2, 0, 1)), small  # [C, r, r]


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in mode L or RGB: alpha over white, 16-bit scaled to 8, CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        x = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(x / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        raise DataError(f"floating-point images (mode {img.mode}) are not supported")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        img = Image.alpha_composite(flat, rgba).convert("RGB")
    return img if img.mode == mode else img.convert(mode)
