"""Writing a dataset root so that it is only ever seen complete.

Local roots are staged in a hidden temporary sibling directory that replaces the root in
one rename on commit, so an interrupted stage leaves the old root (or nothing) in place.
Object stores have no rename: there the old manifest is deleted first, then the old
files, the new files are uploaded, and the manifest goes last. A reader (PyramidStore,
the trainer) refuses a root without a manifest, and DVC never sees a finished output of
a failed stage, so neither takes a partial root as complete.

Nothing is deleted that this project did not write: an output root may be replaced only
when it is absent, empty, or a dataset root (its manifest says ``cfebm-...``), and it may
never be, or contain, one of the stage's inputs. Both are checked when the writer is
made, before anything is read. Hidden staging folders that a killed earlier write of the
same root left behind are removed when the next write starts.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable

import numpy as np

from cfebm.data import layout
from cfebm.data.errors import DataError
from cfebm.data.storage import filesystem, is_local, storage_errors


def npy_bytes(array: np.ndarray) -> memoryview:
    """The ``.npy`` serialisation of ``array`` (no pickles, so readers never unpickle).

    A view of the buffer rather than ``bytes``, which would copy a whole shard once more.
    """
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getbuffer()


class DatasetWriter:
    """Write the files of one dataset root, then its manifest, atomically (see module doc).

    Use as a context manager; ``commit(manifest)`` must be called inside it. Leaving the
    block with an exception (or without committing) removes what was written.
    """

    def __init__(
        self, url: str, storage_options: dict | None = None, inputs: Iterable[str] = ()
    ):
        self.url = str(url).rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.local = is_local(self.fs)
        if self.local:
            self.root = os.path.abspath(self.root)
        self.files: dict[str, str] = {}
        self.stale: list[str] = []
        """Staging folders of interrupted earlier writes, removed by ``__enter__``."""
        self._staging = ""
        self._committed = False
        for source in inputs:
            self._check_not_input(str(source), storage_options)
        with storage_errors(self.url, "inspect"):
            self._check_replaceable()

    def _check_not_input(self, source: str, storage_options: dict | None) -> None:
        fs, path = filesystem(source, storage_options)
        if type(fs) is not type(self.fs):
            return
        path = os.path.abspath(path) if self.local else path.rstrip("/")
        if path == self.root or path.startswith(self.root.rstrip("/") + "/"):
            raise DataError(
                f"output {self.url} contains the input {source}: writing it would replace "
                "the input. Choose an output outside the input."
            )

    def _check_replaceable(self) -> None:
        """DataError unless the root is absent, empty, or a dataset root (see module doc)."""
        fs, root = self.fs, self.root
        if not root.strip("/"):
            raise DataError(f"output {self.url} is the root of its filesystem")
        if not fs.exists(root):
            return
        if not fs.isdir(root):
            raise DataError(f"output {self.url} exists and is not a directory")
        entries = [os.path.basename(str(e).rstrip("/")) for e in fs.ls(root, detail=False)]
        if not entries:
            return
        manifest = f"{root}/{layout.MANIFEST}"
        fmt = None
        if layout.MANIFEST in entries:
            with contextlib.suppress(Exception):
                fmt = json.loads(fs.cat_file(manifest)).get("format")
        if isinstance(fmt, str) and fmt.startswith("cfebm-"):
            return
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise DataError(
            f"output {self.url} already holds other data ({len(entries)} entries: {shown}) "
            "and is not a dataset root that cfebm wrote (no cfebm manifest.json): refusing "
            "to replace it. Choose a new or empty folder for the output."
        )

    def __enter__(self) -> DatasetWriter:
        if self.local:
            parent, name = os.path.split(self.root)
            os.makedirs(parent, exist_ok=True)
            for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
                for stale in glob.glob(os.path.join(glob.escape(parent), pattern)):
                    shutil.rmtree(stale, ignore_errors=True)
                    self.stale.append(stale)
            self._staging = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            os.makedirs(self._staging)
        else:
            self._staging = self.root
            with storage_errors(self.url, "replace"):
                self._clear_remote_root()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._committed:
            return
        if self.local:
            shutil.rmtree(self._staging, ignore_errors=True)
        else:
            # Best effort: files without a manifest are ignored by readers anyway.
            with contextlib.suppress(Exception):
                self.fs.rm(self.root, recursive=True)

    def _clear_remote_root(self) -> None:
        """Delete an old manifest first (so the root stops being 'complete'), then the rest."""
        manifest = f"{self.root}/{layout.MANIFEST}"
        if self.fs.exists(manifest):
            self.fs.rm(manifest)
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache()

    def _write(self, relpath: str, data: bytes | memoryview) -> None:
        path = f"{self._staging}/{relpath}"
        with storage_errors(f"{self.url}/{relpath}", "write"):
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                opened = open(path, "wb")  # noqa: SIM115
            else:
                opened = self.fs.open(path, "wb")
            with opened as f:
                f.write(data)

    def write_array(self, relpath: str, array: np.ndarray) -> None:
        """Write ``array`` as ``<root>/<relpath>`` (.npy) and record its sha256."""
        if not self._staging:
            raise RuntimeError("DatasetWriter.write_array outside its `with` block")
        data = npy_bytes(array)
        self.files[relpath] = hashlib.sha256(data).hexdigest()
        self._write(relpath, data)

    def commit(self, manifest: dict) -> dict:
        """Write the manifest (with the file checksums) last and publish the root."""
        manifest = {**manifest, "files": dict(sorted(self.files.items()))}
        self._write(layout.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        if self.local:
            self._swap_in()
        self._committed = True
        return manifest

    def _swap_in(self) -> None:
        """Replace the local root by the staging directory: old root aside, rename, delete."""
        root = self.root
        old = ""
        if os.path.lexists(root):
            if not os.path.isdir(root) or os.path.islink(root):
                raise DataError(f"output {self.url} exists and is not a directory")
            old = f"{os.path.dirname(root)}/.{os.path.basename(root)}.old-{uuid.uuid4().hex[:8]}"
            os.rename(root, old)
        os.rename(self._staging, root)
        if old:
            shutil.rmtree(old, ignore_errors=True)


class ShardBuffer:
    """Re-chunk batches of images (and labels) of any size into shards of ``shard_size``.

    Memory holds at most one shard plus one incoming batch, whatever the dataset size.
    """

    def __init__(self, writer: DatasetWriter, split: str, resolution: int, shard_size: int):
        self.writer, self.split, self.resolution = writer, split, resolution
        self.shard_size = shard_size
        self.shard_counts: list[int] = []
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0
        self._has_labels: bool | None = None

    def add(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        """Queue a batch: ``images`` uint8 [n, C, H, W], ``labels`` int64 [n] / [n, L] or None."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise TypeError(f"expected uint8 NCHW images, got {images.dtype} {images.shape}")
        has_labels = labels is not None
        if self._has_labels is None:
            self._has_labels = has_labels
        elif self._has_labels != has_labels:
            raise ValueError("a source must give labels for every batch or for none")
        if has_labels and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self._images.append(images)
        if has_labels:
            self._labels.append(np.asarray(labels, dtype=np.int64))
        self._pending += len(images)
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def add_all(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> None:
        for images, labels in batches:
            self.add(images, labels)

    def close(self) -> list[int]:
        """Write the last, partial shard; return the number of images in each shard."""
        if self._pending:
            self._flush(self._pending)
        return self.shard_counts

    @property
    def has_labels(self) -> bool:
        return bool(self._has_labels)

    def _flush(self, n: int) -> None:
        images = np.concatenate(self._images) if len(self._images) > 1 else self._images[0]
        self._images = [images[n:]] if len(images) > n else []
        k = len(self.shard_counts)
        self.writer.write_array(layout.images_path(self.split, self.resolution, k), images[:n])
        if self._has_labels:
            labels = np.concatenate(self._labels)
            self._labels = [labels[n:]] if len(labels) > n else []
            self.writer.write_array(layout.labels_path(self.split, k), labels[:n])
        self._pending -= n
        self.shard_counts.append(n)
