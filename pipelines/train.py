"""DVC stage ``train@<s>``: one coarse-to-fine stage as a resumable Ray Train job.

    python -m pipelines.train --stage S [--params params.yaml] [--workers N] [--dry-run]

Reads section ``train`` of params.yaml (options override it). Stage s trains the model
grown to resolution ``train.model.resolutions[s]``, starting from stage s-1's final model
(``<out>/stage<s-1>/model.pt``), as a Ray Train ``TorchTrainer`` on the cluster at
``RAY_ADDRESS`` (else a local Ray): DDP over ``train.ray.workers`` workers, each reading its
data shard and sampling its own negatives.

Resuming: checkpoints go to ``<train.ray.storage>/stage<s>-<key>`` every
``train.checkpoint.every`` iterations, outside DVC's outputs, where ``<key>`` hashes what
the result depends on (cfebm config, dataset manifest, previous model). Ray retries a
failed worker or node from the latest one (``train.ray.max_failures`` times), and running
the stage again (``dvc repro``) after a crash continues it: same images seen, same beta.

Outputs (DVC outs): ``<out>/stage<s>/model.pt`` (a cfebm checkpoint), ``samples.png``,
``chain.png``, and ``<metrics>/train-stage<s>.json``. Logged to MLflow: a nested run per
stage under the pipeline's parent run (see pipelines/tracking.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import yaml

from cfebm import io as cio
from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import ConfigError, from_dict, to_dict
from cfebm.data import DataError
from cfebm.images import grid_png
from cfebm.trainer import model_from_checkpoint
from pipelines import pictures, ray_utils, tracking
from pipelines._params import apply_overrides, load_section, params_argument
from pipelines.train_loop import (
    TRAINER_FILE,
    StageJob,
    checkpoint_bytes,
    model_only,
    params_finite,
    train_loop_per_worker,
)
from pipelines.train_params import (
    SECTION,
    TrainParams,
    check_stage,
    file_sha256,
    params_from_dict,
    run_key,
    worker_config,
)

# Command-line options and the params key each overrides.
OVERRIDES = {
    "workers": ("ray", "workers"),
    "use_gpu": ("ray", "use_gpu"),
    "storage": ("ray", "storage"),
    "ray_address": ("ray", "address"),
    "max_failures": ("ray", "max_failures"),
    "tracking_uri": ("mlflow", "tracking_uri"),
    "experiment": ("mlflow", "experiment"),
    "data": (None, "data"),
    "out": (None, "out"),
}


class StageError(RuntimeError):
    """The stage could not produce a model (diverged past the rollback limit, or failed)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description=__doc__.split("\n\n")[0],
        epilog="Every other setting is in section 'train' of params.yaml (see its comments).",
    )
    params_argument(p)
    p.add_argument("--stage", type=int, required=True, help="stage index s (0 = coarsest)")
    p.add_argument("--workers", type=int, help="data-parallel workers [train.ray.workers]")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, help="[train.ray.use_gpu]")
    p.add_argument("--storage", help="checkpoint storage, folder or s3://... [train.ray.storage]")
    p.add_argument("--ray-address", help="Ray cluster [train.ray.address, else RAY_ADDRESS]")
    p.add_argument("--max-failures", type=int, help="Ray Train retries [train.ray.max_failures]")
    p.add_argument("--tracking-uri", help="MLflow tracking URI [train.mlflow.tracking_uri]")
    p.add_argument("--experiment", help="MLflow experiment [train.mlflow.experiment]")
    p.add_argument("--data", help="pyramid dataset root [train.data]")
    p.add_argument("--out", help="folder of the stage outputs [train.out]")
    return p


def resolve(argv: list[str] | None = None) -> tuple[TrainParams, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    section = load_section(args.params or "params.yaml", SECTION, required=bool(args.params))
    section = apply_overrides(section, args, OVERRIDES)
    params = params_from_dict(section)
    check_stage(params.cfebm, args.stage)
    return params, args


def previous_model(params: TrainParams, stage: int) -> tuple[dict | None, str, int]:
    """Stage s-1's final model (model-only), its sha256 and the images trained on so far;
    (None, "", 0) for stage 0."""
    if stage == 0:
        return None, "", 0
    path = params.model_path(stage - 1)
    if not cio.exists(path):
        raise StageError(
            f"stage {stage} starts from stage {stage - 1}'s model, but {path} does not exist: "
            f"run that stage first (dvc repro train@{stage - 1})"
        )
    prev = load_checkpoint(path)
    prev_model = from_dict(prev["config"]).model
    if prev_model != params.cfebm.model:
        raise StageError(
            f"{path} was trained with a different train.model ({prev_model}); re-run stage "
            f"{stage - 1} with the current settings"
        )
    if int(prev["stage"]) != stage - 1:
        raise StageError(f"{path} holds a stage-{prev['stage']} model, expected {stage - 1}")
    return model_only(prev), file_sha256(path), int(prev["state"]["total_images"])


def stage_params_for_mlflow(params: TrainParams, stage: int, run_name: str, world: int) -> dict:
    flat = tracking.flatten(params.public())
    flat.pop("stages", None)
    flat.update(
        {
            "stage": str(stage),
            "resolution": str(params.cfebm.model.resolutions[stage]),
            "ray_run_name": run_name,
            "per_worker_batch": json.dumps(worker_config(params.cfebm, world).train.batch_size),
        }
    )
    return flat


def run_stage(params: TrainParams, stage: int, echo=print) -> dict:
    """Train stage ``stage`` on Ray and write its outputs; returns the metrics written."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t_start = time.time()
    cfg = params.cfebm
    res = cfg.model.resolutions[stage]
    prev, prev_sha, prev_images = previous_model(params, stage)
    data_key = ray_utils.dataset_key(params.data, params.data_storage_options)
    key = run_key(cfg, stage, {"dataset": data_key, "previous_model": prev_sha})
    run_name = f"stage{stage}-{res}x{res}-{key}"
    worker_config(cfg, params.ray.workers)  # fails early if the batches do not split

    echo(f"train: {ray_utils.connect(params.ray.address, params.ray.local_cpus)}")
    nodes = len(ray_utils.alive_nodes())
    storage = ray_utils.absolute(params.ray.storage)
    ray_utils.check_paths(nodes, {"train.ray.storage": storage}, params.ray.shared_filesystem)
    data_url = ray_utils.dataset_for_workers(
        params.data,
        storage,
        nodes,
        params.ray.shared_filesystem,
        params.data_storage_options,
        params.ray.storage_options,
    )
    storage_path, storage_fs = ray_utils.ray_storage(storage, params.ray.storage_options)
    run_url = ray_utils.join(storage, run_name)
    echo(f"train: stage {stage} ({res}x{res}) on {nodes} node(s); checkpoints in {run_url}")

    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri)
    runs = tracking.PipelineRuns(uri, params.mlflow.experiment)
    parent = runs.parent()
    run_id, continued = runs.stage(
        parent,
        key=run_name,
        run_name=f"stage{stage}-{res}x{res}",
        params=stage_params_for_mlflow(params, stage, run_name, params.ray.workers),
        tags={"cfebm.stage": str(stage), "cfebm.ray_run": run_name},
    )
    logger = tracking.RunLogger(uri, run_id)
    if not continued:
        logger.text(yaml.safe_dump(params.public(), sort_keys=False), "config.yaml")
    echo(f"train: MLflow {uri} run {run_id}" + (" (continued)" if continued else ""))
    try:
        job = StageJob(
            stage=stage,
            config=to_dict(cfg),
            data_url=data_url,
            data_options=params.data_storage_options,
            warm_start=checkpoint_bytes(prev) if prev is not None else None,
            start_total_images=prev_images,
            checkpoint_every=params.checkpoint.every,
            max_rollbacks=params.rollback.max_rollbacks,
            lr_factor=params.rollback.lr_factor,
            reseed=params.rollback.reseed,
            progress_every_s=params.progress_every_s,
            threads=params.ray.threads_per_worker,
            use_gpu=params.ray.use_gpu,
            tracking_uri=uri,
            run_id=run_id,
            log_every=params.mlflow.log_every,
            sample_every=params.mlflow.sample_every,
            num_samples=params.mlflow.num_samples,
            inject_divergence_at_step=params.debug.inject_divergence_at_step,
            inject_divergence_times=params.debug.inject_divergence_times,
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=asdict(job),
            scaling_config=ray.train.ScalingConfig(
                num_workers=params.ray.workers,
                use_gpu=params.ray.use_gpu,
                resources_per_worker=params.ray.resources_per_worker,
                placement_strategy=params.ray.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=params.ray.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=params.checkpoint.keep),
                worker_runtime_env={"env_vars": ray_utils.worker_env()},
                # Ray Train's per-checkpoint INFO lines drown the progress lines.
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        t_fit = time.time()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise StageError(
                f"stage {stage} failed after train.ray.max_failures = "
                f"{params.ray.max_failures} retries: {e}"
            ) from e
        fit_seconds = time.time() - t_fit
        summary = dict(result.return_value or {})
        if summary.get("last") is None and result.metrics:  # resumed a finished stage
            m = result.metrics
            summary["last"] = {
                "loss": m.get("loss"),
                "e_data": m.get("energy_data"),
                "e_sample": m.get("energy_sample"),
            }
        if summary.get("status") == "diverged":
            raise StageError(summary.get("error") or f"stage {stage} diverged")
        if result.checkpoint is None:
            raise StageError(f"stage {stage} finished without a checkpoint in {run_name}")
        with result.checkpoint.as_directory() as d:
            ckpt = load_checkpoint(os.path.join(d, TRAINER_FILE))
        metrics = write_outputs(params, stage, ckpt, logger, summary)
        metrics.update(
            {
                "ray_run": run_url,
                "mlflow_run_id": run_id,
                "fit_seconds": round(fit_seconds, 2),
                "wall_seconds": round(time.time() - t_start, 2),
            }
        )
        write_json(params.metrics_path(stage), metrics)
        final = {"stage_seconds": fit_seconds}
        if metrics["images_per_s"]:
            final["train_images_per_s"] = metrics["images_per_s"]
        logger.metrics(metrics["step"], final)
        logger.flush()
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):  # killed: leave the runs open to continue
            runs.end_stage(run_id, "FAILED")
        raise
    runs.end_stage(run_id, "FINISHED")  # and the parent, unless a later stage reopens it
    return metrics


def write_outputs(params: TrainParams, stage: int, ckpt: dict, logger, summary: dict) -> dict:
    """model.pt, samples.png, chain.png (DVC outs, also logged to MLflow); the metrics."""
    ckpt.pop("pipeline", None)
    model = model_from_checkpoint(ckpt)
    if not params_finite(model):  # the loop never checkpoints NaN weights; be certain
        raise StageError(f"stage {stage}: the final model has non-finite weights; not written")
    out = params.stage_dir(stage)
    os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, "model.pt")
    save_checkpoint(ckpt, model_path)
    cfg = params.cfebm
    seed = cfg.train.seed + 2024
    images = pictures.sample_images(model, cfg.sampler, params.mlflow.num_samples, seed=seed)
    samples_png = grid_png(images, scale=4)
    chain_png = pictures.chain_png(pictures.chain_frames(model, cfg.sampler, seed=seed))
    cio.write_bytes(os.path.join(out, "samples.png"), samples_png)
    cio.write_bytes(os.path.join(out, "chain.png"), chain_png)
    state = ckpt["state"]
    logger.image(pictures.grid(images, scale=2), key="samples", step=state["step"])
    logger.artifact(os.path.join(out, "samples.png"), "final")
    logger.artifact(os.path.join(out, "chain.png"), "final")
    logger.artifact(model_path, "model")
    last = summary.get("last") or {}
    return {
        "stage": stage,
        "resolution": cfg.model.resolutions[stage],
        "step": state["step"],
        "stage_images": state["stage_images"],
        "total_images": state["total_images"],
        "status": summary.get("status"),
        "resumed_from_step": summary.get("resumed_from_step"),
        "steps_this_run": summary.get("steps_this_attempt"),
        "rollbacks": summary.get("rollbacks", 0),
        "lr": summary.get("lr"),
        "workers": summary.get("world_size"),
        "images_per_s": summary.get("images_per_s"),
        "loss": last.get("loss"),
        "energy_data": last.get("e_data"),
        "energy_sample": last.get("e_sample"),
    }


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> None:
    try:
        params, args = resolve(argv)
        if args.dry_run:
            print(json.dumps(params.public(), indent=2))
            return
        metrics = run_stage(params, args.stage)
    except (ConfigError, DataError, StageError, ray_utils.ClusterStorageError) as e:
        sys.exit(f"train: error: {e}")
    print(
        f"train: stage {args.stage} done: step {metrics['step']}, {metrics['stage_images']} "
        f"images, loss {metrics['loss']}, {metrics['rollbacks']} rollback(s); wrote "
        f"{params.stage_dir(args.stage)} and {params.metrics_path(args.stage)}"
    )


if __name__ == "__main__":
    main()
