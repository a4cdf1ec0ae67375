"""Source ``cifar10``: the CIFAR-10 python archive (``cifar-10-python.tar.gz``).

Layout: ``cifar-10-batches-py/data_batch_1..5`` (train), ``test_batch`` (test) and
``batches.meta``; each batch a pickled dict with ``b"data"`` (uint8 [N, 3072], R then G
then B planes of 32x32 row-major) and ``b"labels"`` (N ints). Any archive in this format
is accepted (fewer batches, fewer rows), read from a path or any fsspec URL in one
streaming pass, or a directory holding the extracted batch files. The batch files are held
in memory while converting (about 180 MB for the full CIFAR-10).

The batches are pickles. Unpickling can run arbitrary code, so a restricted unpickler
admits only the numpy array constructors that these files need.
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
import zlib

import numpy as np

from cfebm.data.errors import DataError
from cfebm.data.images import resize_batch, to_channels
from cfebm.data.source import Source
from cfebm.data.storage import filesystem, storage_errors, to_url

_TRAIN = re.compile(r"(?:^|/)data_batch_(\d+)$")
_TEST = re.compile(r"(?:^|/)test_batch$")
_META = re.compile(r"(?:^|/)batches\.meta$")
_NATIVE = 32

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, and refuses every other global."""

    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core", "numpy._core")  # pickles from numpy < 2
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def load_cifar_source(
    url: str,
    resolution: int,
    channels: int,
    resample: str,
    storage_options: dict | None = None,
) -> Source:
    """Train batches (by number) and the test batch of the archive or directory at ``url``."""
    members = _read_members(url, storage_options)
    train_names = sorted((n for n in members if _TRAIN.search(n)), key=_batch_number)
    test_names = [n for n in members if _TEST.search(n)]
    if not train_names and not test_names:
        found = ", ".join(sorted(members)[:8]) or "nothing"
        raise DataError(
            f"{url} holds no CIFAR-10 batches (data_batch_N / test_batch); found: {found}"
        )

    def batches(names: list[str]):
        for name in names:
            images, labels = _parse_batch(members.pop(name), f"{url}:{name}")
            if len(labels) and labels.max() >= len(label_names):
                raise DataError(
                    f"{url}:{name}: label {labels.max()} but only {len(label_names)} classes"
                )
            if resolution > images.shape[-1]:
                source.upsampled += len(images)
            images = to_channels(resize_batch(images, resolution, resample), channels)
            yield images, labels

    meta = next((n for n in members if _META.search(n)), None)
    n_classes = 0
    label_names = _label_names(members[meta], f"{url}:{meta}") if meta else None
    if label_names is None:  # no meta: name classes by index, as many as the labels use
        for name in train_names + test_names:
            labels = _parse_batch(members[name], f"{url}:{name}")[1]
            n_classes = max(n_classes, int(labels.max(initial=-1)) + 1)
        label_names = [f"class_{i}" for i in range(n_classes)]
    source = Source(
        channels=channels,
        splits={"train": batches(train_names), "test": batches(test_names)},
        label_names=label_names,
    )
    return source


def _batch_number(name: str) -> int:
    return int(_TRAIN.search(name).group(1))


def _wanted(name: str) -> bool:
    return bool(_TRAIN.search(name) or _TEST.search(name) or _META.search(name))


def _read_members(url: str, storage_options: dict | None) -> dict[str, bytes]:
    """Bytes of the batch files in the archive (or directory) at ``url``, by member name."""
    fs, path = filesystem(url, storage_options)
    with storage_errors(url, "read"):
        if not fs.exists(path):
            raise DataError(f"prepare.url: no such file or directory: {url}")
        if fs.isdir(path):
            files = [p for p in fs.find(path) if _wanted(p)]
            return {p[len(path) :].lstrip("/"): fs.cat_file(p) for p in files}
        if fs.size(path) == 0:
            raise DataError(f"{url} is an empty file (0 bytes), not a CIFAR-10 archive")
        with fs.open(path, "rb") as f:
            return _read_tar(f, to_url(fs, path))


def _read_tar(fileobj, url: str) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    try:
        # "r|*": one sequential pass with transparent gzip/bz2/xz, no seeking on S3.
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and _wanted(member.name):
                    members[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{url} is not a readable tar archive (gz/bz2/xz or plain): {e}") from e
    return members


def _unpickle(data: bytes, where: str) -> object:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{where} is not a CIFAR-10 batch pickle: {e}") from e


def _field(batch: dict, key: str):
    return batch.get(key.encode(), batch.get(key))


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 3, 32, 32] images and int64 [N] labels of one batch file."""
    batch = _unpickle(data, where)
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    raw, labels = _field(batch, "data"), _field(batch, "labels")
    if raw is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
        raise DataError(f"{where}: expected keys 'data' and 'labels', found {keys}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * _NATIVE * _NATIVE:
        raise DataError(f"{where}: 'data' must be uint8 [N, 3072], got {raw.dtype} {raw.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(raw),):
        raise DataError(f"{where}: {labels.shape} labels for {len(raw)} images")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{where}: negative labels")
    return raw.reshape(-1, 3, _NATIVE, _NATIVE), labels


def _label_names(data: bytes, where: str) -> list[str] | None:
    meta = _unpickle(data, where)
    names = _field(meta, "label_names") if isinstance(meta, dict) else None
    if names is None:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
