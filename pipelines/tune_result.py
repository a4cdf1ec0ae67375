"""Reading the ``tune`` stage's result where the training stages use it.

``train.sampler_from_tune: tune/best.json`` makes every training stage sample with the
tuned Langevin settings: the ``sampler`` entries of that file (``step_size``,
``noise_start``, and ``steps`` when it was searched) override ``train.sampler``. Null
switches it off. The resolved sampler is part of the cfebm config, so it is saved in every
checkpoint, logged to MLflow and hashed into the training run's key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from cfebm import io as cio
from cfebm.config import ConfigError

TUNED_KEYS = ("step_size", "noise_start", "steps")


def tuned_sampler(path: str | None) -> dict:
    """The tuned sampler settings in the tune stage's output ``path`` ({} when None).

    Raises ConfigError, naming the file, when it is missing or not a tune result.
    """
    if not path:
        return {}
    if not cio.exists(path):
        raise ConfigError(
            f"train.sampler_from_tune: {path} does not exist; run the tune stage first "
            "(dvc repro tune, or python -m pipelines.tune), or set it to null"
        )
    try:
        data = json.loads(cio.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.sampler_from_tune: {path} is not JSON ({e})") from e
    sampler = data.get("sampler") if isinstance(data, Mapping) else None
    if not isinstance(sampler, Mapping) or not sampler:
        raise ConfigError(f"train.sampler_from_tune: {path} has no 'sampler' settings")
    unknown = sorted(set(sampler) - set(TUNED_KEYS))
    if unknown:
        raise ConfigError(f"train.sampler_from_tune: {path} sets unknown sampler keys {unknown}")
    out: dict = {}
    for key, value in sampler.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"train.sampler_from_tune: {path}: {key} = {value!r} is not a number")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"train.sampler_from_tune: {path}: {key} = {value!r} is not valid")
        out[key] = int(value) if key == "steps" else float(value)
    return out


def apply_tuned_sampler(sampler: Mapping | None, path: str | None) -> dict:
    """``sampler`` (the ``train.sampler`` section) with the tuned settings of ``path`` over
    it; unchanged when ``path`` is None."""
    return {**dict(sampler or {}), **tuned_sampler(path)}
