"""DVC stage ``evaluate``: FID / KID / precision-recall and a sample grid for every stage.

    python -m pipelines.evaluate [--params params.yaml] [--models M0 M1 ...] [...]

For each stage checkpoint, draws N samples from its coarse-to-fine chain (in batches,
seeded) and measures them against that stage's data (the pyramid level of the stage's
resolution) with each configured feature extractor (cfebm.metrics): torch-fidelity's
``inception-v3-compat`` (weights from a path/URL or the standard download) and/or the
domain CNN ``cfebm-<dataset>-cnn`` trained by ``pipelines.features``. Writes a DVC metrics
JSON nested per stage (keys ``<metric>_<extractor>``), a PNG grid per stage, and logs both
to MLflow. Reads section ``evaluate`` of params.yaml; options override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from cfebm import io as cio
from cfebm.checkpoint import load_checkpoint
from cfebm.config import ConfigError, SamplerConfig, from_dict, to_dict
from cfebm.data import DataError, PyramidStore
from cfebm.features import FeatureError, load_feature_net
from cfebm.images import grid_png
from cfebm.metrics import (
    DOMAIN,
    INCEPTION,
    Extractor,
    InceptionWeightsError,
    MetricsConfig,
    compute_metrics,
    domain_extractor,
    inception_extractor,
)
from cfebm.sampling import sample, to_uint8
from cfebm.schedules import fade_beta
from cfebm.trainer import model_from_checkpoint
from pipelines._params import (
    json_mapping,
    load_section,
    nullable,
    nullable_int,
    overrides,
    stage_parser,
)

SECTION = "evaluate"
EXTRACTORS = (DOMAIN, INCEPTION)


def _build(cls: type, values: dict | None, where: str):
    """``cls(**values)`` with unknown keys and bad values reported as ConfigError."""
    values = dict(values or {})
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {where} option(s) {unknown}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


@dataclass
class MlflowSettings:
    enabled: bool = True
    """Log the metrics and grids to MLflow (a nested ``evaluate`` run of the pipeline run)."""
    tracking_uri: str | None = None
    """null: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (as the training stages)."""
    experiment: str = "cfebm"


@dataclass
class EvaluateParams:
    """Settings of the ``evaluate`` stage (params.yaml section ``evaluate``)."""

    models: list[str] = field(default_factory=list)
    """Stage checkpoints (paths or URLs), one per stage to evaluate."""
    data: str = "data/pyramid"
    """The pyramid dataset root whose levels are each stage's reference data."""
    data_storage_options: dict = field(default_factory=dict)
    split: str = "train"
    """Reference split (the paper measures against training-set statistics)."""
    num_reference: int | None = None
    """Reference images drawn from the split (seeded); null: all of them."""
    num_samples: int = 1000
    """N: samples drawn per stage."""
    sample_batch: int = 250
    """Langevin chains run at once."""
    seed: int = 0
    """Seeds the chains, the reference subset and the KID subsets."""
    sampler: dict = field(default_factory=dict)
    """Overrides of the checkpoint's sampler settings (cfebm SamplerConfig keys)."""
    bf16: bool = False
    """Run the energies in bfloat16 while sampling."""
    extractors: list[str] = field(default_factory=lambda: [DOMAIN])
    """Feature extractors: ``domain`` (the features stage's CNN) and/or
    ``inception-v3-compat``."""
    features: str = "models/features.pt"
    """Weights of the domain extractor (pipelines.features output)."""
    inception_weights: str | None = None
    """InceptionV3 weights, path or fsspec URL; null: torch-fidelity's standard download."""
    inception_download: bool = True
    """With no inception_weights: allow the standard download when the network answers."""
    metrics: dict = field(default_factory=dict)
    """cfebm MetricsConfig: fid, kid, prc, batch_size, kid_subsets, kid_subset_size,
    prc_neighborhood, seed (default: ``seed`` above)."""
    out: str = "metrics/evaluate.json"
    """DVC metrics JSON, nested per stage."""
    grids: str = "outputs/evaluate"
    """Folder of the sample grids, ``stage_<s>.png``."""
    grid_count: int = 64
    """Samples shown in each grid (the first ones drawn)."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.mlflow, MlflowSettings):
            self.mlflow = _build(MlflowSettings, self.mlflow, "evaluate.mlflow")
        self.models = [str(m) for m in self.models]
        self.extractors = list(self.extractors)
        bad = [e for e in self.extractors if e not in EXTRACTORS]
        if not self.extractors or bad:
            raise ConfigError(f"evaluate.extractors must be a non-empty subset of {EXTRACTORS}")
        for name in ("num_samples", "sample_batch", "grid_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name} must be >= 1")
        if self.num_reference is not None and self.num_reference < 2:
            raise ConfigError("evaluate.num_reference must be >= 2 or null")
        self.metrics_config = _build(
            MetricsConfig, {"seed": self.seed, **(self.metrics or {})}, "evaluate.metrics"
        )
        from_dict({"sampler": self.sampler})  # unknown keys and bad values fail here

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def public(self) -> dict:
        """The resolved settings (metric settings with their defaults filled in)."""
        return {**asdict(self), "metrics": asdict(self.metrics_config)}


PARAM_FIELDS = {f.name for f in fields(EvaluateParams)}


def build_parser() -> argparse.ArgumentParser:
    d = EvaluateParams()
    p = stage_parser("pipelines.evaluate", __doc__)
    p.add_argument(
        "--models", nargs="+", metavar="CKPT", help="stage checkpoints to evaluate, paths or URLs"
    )
    p.add_argument("--data", help=f"pyramid dataset root, path or URL [{d.data}]")
    p.add_argument(
        "--data-storage-options",
        type=json_mapping,
        metavar="JSON",
        help="fsspec options for --data",
    )
    p.add_argument("--split", help=f"reference split of the data [{d.split}]")
    p.add_argument(
        "--num-reference",
        type=nullable_int,
        help="reference images drawn from the split; 'none': all [all]",
    )
    p.add_argument("--num-samples", type=int, help=f"N, samples per stage [{d.num_samples}]")
    p.add_argument("--sample-batch", type=int, help=f"chains run at once [{d.sample_batch}]")
    p.add_argument("--seed", type=int, help=f"seed of chains and subsets [{d.seed}]")
    p.add_argument(
        "--sampler",
        type=json_mapping,
        metavar="JSON",
        help='sampler overrides, e.g. \'{"steps": 50, "step_size": 0.5}\' [the checkpoint\'s]',
    )
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, help=f"bfloat16 energies [{d.bf16}]"
    )
    p.add_argument(
        "--extractors",
        nargs="+",
        choices=EXTRACTORS,
        help=f"feature extractors to measure with {d.extractors}",
    )
    p.add_argument("--features", help=f"domain extractor weights, path or URL [{d.features}]")
    p.add_argument(
        "--inception-weights",
        type=nullable,
        help="InceptionV3 weights, path or fsspec URL; 'none': torch-fidelity's standard "
        "download [none]",
    )
    p.add_argument(
        "--inception-download",
        action=argparse.BooleanOptionalAction,
        help="allow the standard Inception download when no weights are given "
        f"[{d.inception_download}]",
    )
    p.add_argument(
        "--metrics",
        type=json_mapping,
        metavar="JSON",
        help='metric settings, e.g. \'{"prc": false, "kid_subset_size": 500}\' '
        f"{json.dumps(asdict(MetricsConfig()))}",
    )
    p.add_argument("--out", help=f"metrics JSON to write (DVC metrics) [{d.out}]")
    p.add_argument("--grids", help=f"folder for the stage_<s>.png grids [{d.grids}]")
    p.add_argument("--grid-count", type=int, help=f"samples per grid [{d.grid_count}]")
    p.add_argument("--device", help=f"cpu, cuda, cuda:1, or auto [{d.device}]")
    p.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        help=f"log metrics and grids to MLflow [{d.mlflow.enabled}]",
    )
    return p


def resolve(argv: list[str] | None = None) -> tuple[EvaluateParams, argparse.Namespace]:
    """The settings from params.yaml's section, overridden by the command line."""
    args = build_parser().parse_args(argv)
    section = dict(load_section(args.params or "params.yaml", SECTION, required=bool(args.params)))
    unknown = sorted(set(section) - PARAM_FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown {SECTION} parameter(s) {unknown}; known: {sorted(PARAM_FIELDS)}"
        )
    values = {**section, **overrides(args, PARAM_FIELDS - {"mlflow"})}
    if args.mlflow is not None:
        values["mlflow"] = {**dict(section.get("mlflow") or {}), "enabled": args.mlflow}
    params = EvaluateParams(**values)
    if not params.models:
        raise ConfigError("no models to evaluate: set evaluate.models or pass --models")
    return params, args


# --- the work -----------------------------------------------------------------------------


def build_extractors(p: EvaluateParams) -> list[Extractor]:
    """The configured extractors, weights resolved and checked before any sampling."""
    out = []
    for name in p.extractors:
        if name == INCEPTION:
            out.append(inception_extractor(p.inception_weights, download=p.inception_download))
        else:
            out.append(domain_extractor(p.features))
    return out


def stage_sampler(ckpt: dict, overrides_: dict) -> tuple[SamplerConfig, float]:
    """The checkpoint's sampler settings with ``overrides_``, and its fade coefficient beta."""
    cfg = from_dict(ckpt["config"])
    sampler = from_dict({"sampler": {**to_dict(cfg.sampler), **overrides_}}).sampler
    images = int((ckpt.get("state") or {}).get("stage_images", 0))
    stage = int(ckpt["stage"])
    beta = fade_beta(images, cfg.train.fade_images, stage) if ckpt.get("state") else 1.0
    return sampler, beta


def draw_samples(
    model, sampler: SamplerConfig, num: int, batch: int, seed: int, beta: float, dtype
) -> np.ndarray:
    """``num`` uint8 samples [N, C, r, r] of the model's stage, in batches; fixed by ``seed``."""
    gen = torch.Generator(device=model.head.linear.weight.device).manual_seed(seed)
    out = []
    for start in range(0, num, batch):
        x = sample(model, min(batch, num - start), sampler, beta=beta, generator=gen, dtype=dtype)
        out.append(to_uint8(x).cpu().numpy())
    return np.concatenate(out)


def reference_images(
    store: PyramidStore, split: str, resolution: int, num: int | None, seed: int
) -> np.ndarray:
    """The split's images at ``resolution`` as uint8 (coarse levels are float mean pools,
    rounded like samples are), optionally a seeded subset of ``num``."""
    images = store.read(split, resolution)
    if num is not None and num < len(images):
        idx = np.sort(np.random.default_rng(seed).choice(len(images), num, replace=False))
        images = images[idx]
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def evaluate_stage(
    p: EvaluateParams, url: str, store: PyramidStore, extractors: list[Extractor], log=print
) -> tuple[int, dict, bytes]:
    """(stage, metrics, grid PNG) of the checkpoint at ``url``."""
    device = p.torch_device()
    ckpt = load_checkpoint(url, map_location=device)
    model = model_from_checkpoint(ckpt, device)
    stage, r = model.stage, model.resolution()
    if model.cfg.channels != store.channels:
        raise ConfigError(
            f"{url} models {model.cfg.channels}-channel images but {store.url} has "
            f"{store.channels} channels"
        )
    if r not in store.resolutions:
        raise ConfigError(f"{store.url} has no level at resolution {r} (stage {stage} of {url})")
    sampler, beta = stage_sampler(ckpt, p.sampler)
    dtype = torch.bfloat16 if p.bf16 else torch.float32
    log(f"evaluate: stage {stage} ({r}x{r}): {p.num_samples} samples, beta {beta:g}, {sampler}")
    samples = draw_samples(model, sampler, p.num_samples, p.sample_batch, p.seed, beta, dtype)
    reference = reference_images(store, p.split, r, p.num_reference, p.seed)
    result: dict = {
        "resolution": r,
        "num_samples": len(samples),
        "num_reference": len(reference),
    }
    for extractor in extractors:
        values = compute_metrics(samples, reference, extractor, p.metrics_config, device=device)
        result.update(values)
        log("evaluate:   " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    scale = max(1, 64 // r)
    return stage, result, grid_png(samples[: p.grid_count], scale=scale)


def flat_metrics(results: dict) -> dict[str, float]:
    """``{"stage_0": {"fid_x": 1.0}}`` -> ``{"stage_0/fid_x": 1.0}``: the DVC key with '/'
    for '.', as MLflow metric names."""
    return {
        f"{stage}/{k}": float(v)
        for stage, values in results.items()
        for k, v in values.items()
        if isinstance(v, (int, float))
    }


def log_to_mlflow(p: EvaluateParams, results: dict, grids: dict[str, bytes]) -> str:
    """Log metrics, grids and settings as a nested ``evaluate`` run of the pipeline run
    (pipelines.tracking); returns its run id. A parent run created just for this stage
    (none was running) is ended with it."""
    from pipelines import tracking  # MLflow only when asked for

    uri = tracking.resolve_tracking_uri(p.mlflow.tracking_uri)
    runs = tracking.PipelineRuns(uri, p.mlflow.experiment)
    parent = runs.parent()
    children = runs.client.search_runs(
        [runs.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1
    )
    run_id, _ = runs.stage(
        parent, "evaluate", "evaluate", tracking.flatten(p.public()), {"cfebm.stage": "evaluate"}
    )
    logger = tracking.RunLogger(uri, run_id)
    logger.metrics(0, flat_metrics(results))
    logger.flush()
    for stage, png in grids.items():
        logger.png(png, f"evaluate/{stage}.png")
    logger.text(json.dumps(results, indent=2), "evaluate/metrics.json")
    runs.end_stage(run_id)
    if not children and not runs.external_parent:
        runs.end_pipeline(parent)
    return run_id


def run(p: EvaluateParams, log=print) -> dict:
    """Evaluate every model; write the metrics JSON and the grids; return the metrics."""
    extractors = build_extractors(p)
    store = PyramidStore(p.data, p.data_storage_options)
    if DOMAIN in p.extractors:
        trained_on = load_feature_net(p.features).meta.get("dataset")
        source = (store.manifest.get("source") or {}).get("source")
        if trained_on != source:
            log(
                f"evaluate: warning: the domain extractor was trained on {trained_on!r}, the "
                f"data is {source!r}; its metrics measure in a {trained_on} feature space"
            )
    results: dict[str, dict] = {}
    grids: dict[str, bytes] = {}
    for url in p.models:
        stage, values, png = evaluate_stage(p, url, store, extractors, log)
        key = f"stage_{stage}"
        if key in results:
            raise ConfigError(f"two checkpoints of stage {stage} in evaluate.models ({url})")
        results[key], grids[key] = values, png
    results = dict(sorted(results.items(), key=lambda kv: int(kv[0].split("_")[1])))
    for key, png in grids.items():
        cio.write_bytes(cio.join(p.grids, f"{key}.png"), png)
    cio.write_bytes(p.out, (json.dumps(results, indent=2) + "\n").encode())
    if p.mlflow.enabled:
        run_id = log_to_mlflow(p, results, grids)
        log(f"evaluate: logged to MLflow run {run_id}")
    return results


def main(argv: list[str] | None = None) -> None:
    try:
        params, args = resolve(argv)
        if args.dry_run:
            print(json.dumps(params.public(), indent=2))
            return
        run(params)
    except (
        ConfigError,
        DataError,
        FeatureError,
        InceptionWeightsError,
        FileNotFoundError,
        ValueError,
    ) as e:
        sys.exit(f"evaluate: error: {e}")
    print(f"evaluate: wrote {params.out} and {params.grids}/stage_<s>.png")


if __name__ == "__main__":
    main()
