"""Reading a pyramid dataset root in shards, from local disk or any fsspec URL.

This is the trainer's view of the data: each worker takes its shards
(``shards_for_worker``) and reads them at the resolution of its stage. Local shards are
memory-mapped; remote shards are downloaded once into a content-addressed local cache
(keyed by the sha256 in the manifest, verified on download) and memory-mapped from there,
so a rewritten dataset can never be served from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from typing import TYPE_CHECKING

import numpy as np

from cfebm import io as cio
from cfebm.data import layout
from cfebm.data.errors import DataError
from cfebm.data.storage import filesystem, is_local, storage_errors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CACHE_ENV = "CFEBM_CACHE_DIR"


def default_cache_dir() -> str:
    """``$CFEBM_CACHE_DIR``, else ``$XDG_CACHE_HOME/cfebm/shards`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cfebm", "shards")


class PyramidStore:
    """A complete dataset root (format ``cfebm-pyramid/1``) opened for reading.

    ``url`` is a local directory or any fsspec URL; ``storage_options`` go to fsspec.
    A root without ``manifest.json`` is missing or incomplete and raises DataError.
    """

    def __init__(
        self, url: str, storage_options: dict | None = None, *, cache_dir: str | None = None
    ):
        self.url = str(url).rstrip("/")
        self._fs, self._root = filesystem(self.url, storage_options)
        self._local = is_local(self._fs)
        self._cache_dir = cache_dir or default_cache_dir()
        self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict:
        path = f"{self._root}/{layout.MANIFEST}"
        try:
            with storage_errors(self.url, "read the dataset at"), self._fs.open(path, "rb") as f:
                manifest = json.loads(f.read())
        except DataError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                raise DataError(
                    f"no complete dataset at {self.url}: {layout.MANIFEST} is missing (the "
                    "root does not exist, or the stage that writes it was interrupted; "
                    "re-run prepare/pyramid)"
                ) from e
            raise
        except json.JSONDecodeError as e:
            raise DataError(f"{self.url}/{layout.MANIFEST} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != layout.FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest)
            raise DataError(f"{self.url}: expected format {layout.FORMAT!r}, found {found!r}")
        return manifest

    def __repr__(self) -> str:
        return f"PyramidStore({self.url!r}, resolutions={self.resolutions})"

    # --- what the manifest says -----------------------------------------------------------

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def resolutions(self) -> list[int]:
        """Available resolutions, coarsest first."""
        return [int(r) for r in self.manifest["resolutions"]]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest.get("has_labels"))

    @property
    def label_names(self) -> list:
        return self.manifest.get("label_names") or []

    def count(self, split: str) -> int:
        """Number of images in ``split``."""
        return int(self._split(split)["count"])

    def num_shards(self, split: str) -> int:
        return int(self._split(split)["shards"])

    def shard_counts(self, split: str) -> list[int]:
        """Number of images in each shard of ``split`` (the last one may be smaller)."""
        return [int(n) for n in self._split(split)["shard_counts"]]

    def dtype(self, resolution: int) -> np.dtype:
        return np.dtype(self._level(resolution)["dtype"])

    def shard_urls(self, split: str, resolution: int) -> list[str]:
        """URLs of the image shards of ``split`` at ``resolution``, in shard order."""
        self._level(resolution)
        n = self.num_shards(split)
        return [f"{self.url}/{layout.images_path(split, resolution, k)}" for k in range(n)]

    # --- reading --------------------------------------------------------------------------

    def read_shard(self, split: str, resolution: int, shard: int) -> np.ndarray:
        """Shard ``shard`` of ``split`` at ``resolution`` as a read-only memory map [n, C, r, r]."""
        self._level(resolution)
        self._check_shards(split, [shard])
        return self._load(layout.images_path(split, resolution, shard))

    def read(self, split: str, resolution: int, shards: list[int] | None = None) -> np.ndarray:
        """Images [n, C, r, r] of the listed shards (all when None), in shard order.

        The finest level is uint8, coarser levels float32, all in [0, 255]. One shard comes
        back as a memory map (nothing is read until used); several are concatenated, which
        copies them into memory.
        """
        self._level(resolution)
        shards = self._check_shards(split, shards)
        arrays = [self._load(layout.images_path(split, resolution, k)) for k in shards]
        if len(arrays) == 1:
            return arrays[0]
        if not arrays:
            shape = (0, self.channels, resolution, resolution)
            return np.empty(shape, dtype=self.dtype(resolution))
        return np.concatenate(arrays)

    def subset(self, split: str, resolution: int, num: int | None, seed: int) -> np.ndarray:
        """The split's images at ``resolution``: all of them, or a seeded subset of ``num``
        in dataset order (the same seed gives the same images)."""
        images = self.read(split, resolution)
        if num is not None and num < len(images):
            idx = np.sort(np.random.default_rng(seed).choice(len(images), num, replace=False))
            images = images[idx]
        return images

    def labels(self, split: str, shards: list[int] | None = None) -> np.ndarray:
        """int64 labels [n] or [n, L] of the listed shards (all when None), in shard order."""
        if not self.has_labels:
            raise DataError(f"the dataset at {self.url} has no labels")
        shards = self._check_shards(split, shards)
        arrays = [np.asarray(self._load(layout.labels_path(split, k))) for k in shards]
        if not arrays:
            return np.empty((0,), dtype=np.int64)
        return np.concatenate(arrays)

    # --- internals ------------------------------------------------------------------------

    def _split(self, split: str) -> dict:
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.url} has no split {split!r}; it has {sorted(splits)}")
        return splits[split]

    def _level(self, resolution: int) -> dict:
        levels = self.manifest["levels"]
        if str(resolution) not in levels:
            raise DataError(
                f"{self.url} has no resolution {resolution!r}; it has {self.resolutions}"
            )
        return levels[str(resolution)]

    def _check_shards(self, split: str, shards: list[int] | None) -> list[int]:
        n = self.num_shards(split)
        if shards is None:
            return list(range(n))
        shards = [int(k) for k in shards]
        bad = [k for k in shards if not 0 <= k < n]
        if bad:
            raise DataError(f"{self.url}: split {split!r} has shards 0..{n - 1}, asked for {bad}")
        return shards

    def _load(self, relpath: str) -> np.ndarray:
        if self._local:
            path = f"{self._root}/{relpath}"
            with storage_errors(f"{self.url}/{relpath}", "read"):
                return np.load(path, mmap_mode="r", allow_pickle=False)
        return np.load(self._cached(relpath), mmap_mode="r", allow_pickle=False)

    def _cached(self, relpath: str) -> str:
        """Local path of a verified copy of remote file ``relpath`` (downloaded once)."""
        sha = self.manifest["files"].get(relpath)
        if sha is None:
            raise DataError(f"{self.url}/{layout.MANIFEST} does not list {relpath}")
        local = os.path.join(self._cache_dir, sha[:2], f"{sha}.npy")
        if os.path.exists(local):
            return local
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        url = f"{self.url}/{relpath}"
        try:
            with storage_errors(url, "read"):
                self._fs.get_file(f"{self._root}/{relpath}", tmp)
            if _sha256_file(tmp) != sha:
                raise DataError(
                    f"{url} does not match its checksum in the manifest (corrupt object, or "
                    "the dataset was rewritten while being read)"
                )
            os.replace(tmp, local)  # atomic: concurrent workers may download the same shard
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return local


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shards_for_worker(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shard indices of worker ``rank`` of ``world_size``: round robin, ``rank::world_size``.

    Raises DataError when a worker would get no shard (fewer shards than workers): write the
    dataset with a smaller ``prepare.shard_size`` or use fewer workers.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    if num_shards < world_size:
        raise DataError(
            f"{num_shards} shard(s) for {world_size} workers: worker(s) "
            f"{num_shards}..{world_size - 1} would get no data; lower prepare.shard_size "
            "or use fewer workers"
        )
    return list(range(rank, num_shards, world_size))


def worker_images(
    store: PyramidStore, resolution: int, rank: int, world: int
) -> tuple[np.ndarray, str]:
    """(this data-parallel worker's training images [n, C, r, r], how it got them).

    With at least as many shards as workers each worker reads its own shards; with fewer
    (a small dataset in one shard) every worker reads all of them, and its own data order
    (seeded by rank) makes each step's global batch a set of independent draws.
    """
    n = store.num_shards("train")
    if n >= world:
        shards = shards_for_worker(n, rank, world)
        how = f"shards {shards} of {n}"
    else:
        shards, how = list(range(n)), f"all {n} shard(s) (fewer shards than {world} workers)"
    return np.array(store.read("train", resolution, shards)), how  # a copy, off the memory map


def training_images(store: PyramidStore, resolutions) -> dict[int, torch.Tensor]:
    """The training images [N, C, r, r] (the [0, 255] scale) at each of ``resolutions``."""
    import torch

    missing = [r for r in resolutions if r not in store.resolutions]
    if missing:
        raise DataError(
            f"{store.url} has no level at {missing} (it has {store.resolutions}): "
            f"build its pyramid down to {min(resolutions)}x{min(resolutions)}"
        )
    return {r: torch.from_numpy(np.array(store.read("train", r))) for r in resolutions}


def dataset_key(url: str, storage_options: dict | None = None) -> str:
    """Content key of a pyramid root: the hash of its manifest (which lists file sha256s)."""
    fs, root = filesystem(url, storage_options)
    with fs.open(f"{root.rstrip('/')}/{layout.MANIFEST}", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def copy_dataset(
    url: str, folder: str, options: dict | None = None, folder_options: dict | None = None
) -> str:
    """Copy the pyramid root at ``url`` to ``<folder>/<key>``, once; returns the copy's URL.

    The copy is content-addressed by the manifest, written file by file with the manifest
    last, so a partial copy is never taken for a complete one and a finished copy is reused.
    """
    dest = f"{str(folder).rstrip('/')}/{dataset_key(url, options)[:16]}"
    src_fs, src_root = filesystem(url, options)
    dst_fs, dst_root = filesystem(dest, folder_options)
    if dst_fs.exists(f"{dst_root}/{layout.MANIFEST}"):
        return dest
    with src_fs.open(f"{src_root}/{layout.MANIFEST}", "rb") as f:
        manifest = f.read()
    for rel in json.loads(manifest)["files"]:
        with src_fs.open(f"{src_root}/{rel}", "rb") as f:
            dst_fs.pipe_file(f"{dst_root}/{rel}", f.read())
    dst_fs.pipe_file(f"{dst_root}/{layout.MANIFEST}", manifest)
    return dest


class ClusterStorageError(ValueError):
    """A path that the workers of a multi-node cluster cannot all reach."""


def check_paths(nodes: int, paths: dict[str, str], shared_filesystem: bool) -> None:
    """Refuse local ``paths`` (name -> URL) when the job's workers run on several nodes
    (machines), unless ``shared_filesystem`` says that every node mounts them (NFS): what a
    worker writes to a local path no other node would find."""
    if nodes <= 1 or shared_filesystem:
        return
    local = {name: url for name, url in paths.items() if cio.is_local(url)}
    if local:
        listed = ", ".join(f"{name} = {url}" for name, url in local.items())
        raise ClusterStorageError(
            f"the Ray cluster has {nodes} nodes but {listed} is a local path: workers on "
            "other nodes would write checkpoints where no one finds them again. Use shared "
            "storage (e.g. train.ray.storage: s3://bucket/cfebm-runs), or set "
            "train.ray.shared_filesystem: true if this path is on a filesystem that every "
            "node mounts (NFS)."
        )


def dataset_for_workers(
    data_url: str,
    storage_url: str,
    nodes: int,
    shared_filesystem: bool,
    data_options: dict | None = None,
    storage_options: dict | None = None,
) -> str:
    """Where workers on ``nodes`` machines read the dataset: ``data_url`` itself unless it
    is local and there are several nodes, in which case a copy in the run storage."""
    if nodes <= 1 or shared_filesystem or not cio.is_local(data_url):
        return cio.absolute(data_url)
    dest = copy_dataset(data_url, cio.join(storage_url, "datasets"), data_options, storage_options)
    log.info("the cluster's workers read the dataset %s from its copy %s", data_url, dest)
    return dest


def to_unit_range(array: np.ndarray) -> torch.Tensor:
    """float32 tensor in [-1, 1] from images in the [0, 255] scale: ``x / 127.5 - 1``.

    Always a copy, so read-only memory maps are safe to pass.
    """
    import torch  # here, not at module level: the data stages never need torch

    x = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    return x.div_(127.5).sub_(1.0)
