"""Multi-resolution image datasets: sources, the sharded pyramid format and its reader.

Pure numpy / PIL / fsspec (torch only inside ``to_unit_range``). The stages are
``prepare`` (a source -> uint8 images at the finest resolution) and ``build_pyramid``
(exact 2x2 mean pools down to the coarsest resolution); ``PyramidStore`` reads the
result in shards from local disk or any fsspec URL.
"""

from cfebm.data.errors import DataError
from cfebm.data.prepare import PrepareConfig, prepare
from cfebm.data.pyramid import PyramidConfig, build_pyramid, mean_pool2x
from cfebm.data.store import (
    PyramidStore,
    shards_for_worker,
    to_unit_range,
    training_images,
    worker_images,
)

__all__ = [
    "DataError",
    "PrepareConfig",
    "PyramidConfig",
    "PyramidStore",
    "build_pyramid",
    "mean_pool2x",
    "prepare",
    "shards_for_worker",
    "to_unit_range",
    "training_images",
    "worker_images",
]
