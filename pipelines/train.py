"""DVC stage ``train@<s>``: one coarse-to-fine stage as a resumable Ray Train job.

    python -m pipelines.train --stage S [--params params.yaml] [--optim.lr '{4: 0.002}'] ...

Stage s trains the network of resolution ``train.model.resolutions[s]``, warm-started from
stage s-1's model (``<out>/stage<s-1>/model.pt``; every earlier stage's network stays frozen
and samples its resolution in the chain), as a Ray Train job on the cluster at
``RAY_ADDRESS`` (else a local Ray): DDP over ``train.ray.workers`` workers, each reading its
data shard and sampling its own negatives. The loop is cfebm's (:func:`cfebm.loop.
train_stage`); this module supplies the data, the checkpoint and report hooks, and MLflow.

Resuming: checkpoints go to ``<train.ray.storage>/stage<s>-<r>x<r>-<key>`` every
``train.loop.checkpoint_every`` steps, outside DVC's outputs; ``<key>`` hashes what the
result depends on (config, dataset, previous model). Ray retries a failed worker or node
from the latest checkpoint (``train.ray.max_failures`` times), and running the stage again
after a crash continues it: same images seen, same beta, same MLflow run. Its outputs
(DVC) are those of :func:`cfebm.stage.write_stage_outputs` and ``run.json``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from cfebm import io as cio
from cfebm.checkpoint import (
    TRAINER_FILE,
    load_checkpoint,
    load_worker_checkpoint,
    save_worker_checkpoint,
)
from cfebm.config import (
    CFEBMConfig,
    ConfigError,
    ModelConfig,
    SamplerConfig,
    Selection,
    TrainConfig,
    build_dataclass,
)
from cfebm.data import DataError, PyramidStore
from cfebm.features import FeatureError
from cfebm.images import make_grid
from cfebm.loop import FaultInjection, Hooks, LoopConfig, MetricsLog, train_stage
from cfebm.redact import public, redact_url
from cfebm.sampling import draw
from cfebm.search import tuned_sampler
from cfebm.stage import check_stage, run_record, score_weights, stage_worker, write_stage_outputs
from cfebm.trainer import Trainer, model_file
from pipelines import _cli, ray_utils, tracking


@dataclass
class RayOptions(ray_utils.ClusterOptions):
    """Where and how wide a stage runs."""

    workers: int = 1
    """Data-parallel workers (DDP). Batch sizes are global: each worker takes
    ``batch_size / workers`` images per step."""
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    """Ray resources of each worker; ``CPU`` also sets its torch threads."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """PACK fills a node first; SPREAD puts workers on different nodes where it can."""
    poll_interval_s: float = 0.25
    """Seconds between Ray Train's checks of its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S;
    Ray's default is 2). A checkpoint's report waits for the next check, so with fast steps
    a long interval stalls every checkpoint; a lost worker is noticed within it too."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers < 1:
            raise ConfigError(f"train.ray.workers must be >= 1, got {self.workers}")
        if not self.poll_interval_s > 0:
            raise ConfigError(f"train.ray.poll_interval_s must be > 0, got {self.poll_interval_s}")

    @property
    def threads_per_worker(self) -> int:
        return max(1, int(self.resources_per_worker.get("CPU", 1)))


@dataclass
class SampleLogging:
    every: int = 200
    """Steps between sample grids logged to MLflow during a stage (0: only at the end)."""
    count: int = 64
    """Samples in each grid (and in samples.png)."""


@dataclass
class TrainStage:
    """Train one coarse-to-fine stage (params.yaml section ``train``)."""

    stages: list[dict] = field(default_factory=list)
    """The DVC wiring (dvc.yaml ``foreach``): one ``{stage, after}`` per resolution."""
    data: str = "data/pyramid"
    """The pyramid dataset root (local or any fsspec URL)."""
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    out: str = "models"
    """Stage outputs: ``<out>/stage<s>/model.pt`` and ``run.json`` (how the run went)."""
    metrics: str = "metrics"
    """DVC metrics: ``<metrics>/train-stage<s>.json``."""
    plots: str = "plots"
    """DVC plots: ``<plots>/{train,beta,speed}/stage<s>.csv`` (per step: loss and
    energies, beta, images/s), ``<plots>/scores/stage<s>.csv`` (the selection's scores,
    the last stage only), ``<plots>/images/stage<s>/{samples,chain}.png``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    sampler_from_tune: str | None = None
    """A file of sampler settings that override ``sampler``: the tune stage's result
    (tune/best.json; DVC then runs the search before training), or tune/untuned.json (no
    settings: ``sampler`` as it is)."""
    optim: TrainConfig = field(default_factory=TrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    selection: Selection = field(default_factory=Selection)
    ray: RayOptions = field(default_factory=RayOptions)
    mlflow: tracking.TrackingOptions = field(default_factory=tracking.TrackingOptions)
    samples: SampleLogging = field(default_factory=SampleLogging)
    debug: FaultInjection = field(default_factory=FaultInjection)
    registered_model: str | None = None
    """MLflow registered model of the last stage (a new version per run; ``@latest`` names
    the newest); null: ``cfebm-<data source>``, e.g. cfebm-digits; "": not registered."""

    def __post_init__(self) -> None:
        n = self.model.num_stages
        if self.stages and len(self.stages) != n:
            raise ConfigError(
                f"train.stages lists {len(self.stages)} stage(s) but train.model.resolutions "
                f"{list(self.model.resolutions)} has {n}: one DVC stage per resolution"
            )
        for s, item in enumerate(self.stages):
            after = self.data if s == 0 else self.model_path(s - 1)
            # Stage 0 may instead run after the selection's features (which the last
            # stage needs; the pyramid is a dependency of every stage anyway).
            allowed = {_norm(after)} | ({_norm(self.selection.features)} if s == 0 else set())
            if item.get("stage") != s or _norm(item.get("after")) not in allowed:
                raise ConfigError(
                    f"train.stages[{s}] is {item}; expected {{stage: {s}, after: {after}}} "
                    "(stage 0 runs after the pyramid, or after train.selection.features, "
                    "stage s after stage s-1's model)"
                )

    def config(self) -> CFEBMConfig:
        """The cfebm config the stage trains (the tuned sampler laid over ``sampler``)."""
        sampler = self.sampler
        if self.sampler_from_tune:
            sampler = replace(sampler, **tuned_sampler(self.sampler_from_tune))
        return CFEBMConfig(self.model, sampler, self.optim)

    def registered_name(self) -> str | None:
        """The last stage's MLflow registered model (:attr:`registered_model`; None: none)."""
        if self.registered_model is not None:
            return self.registered_model or None
        source = PyramidStore(self.data, self.data_storage_options).manifest.get("source")
        return f"cfebm-{(source or {}).get('source', 'data')}"

    @classmethod
    def read(cls, params: str | None) -> TrainStage:
        """The ``train`` section of the params file ``params`` (tune and ablation use it)."""
        return build_dataclass(cls, _cli.load_section(params, "train"), "train")

    def model_path(self, stage: int) -> str:
        return os.path.join(self.out, f"stage{stage}", "model.pt")

    def stage_dir(self, stage: int) -> str:
        return os.path.join(self.out, f"stage{stage}")


def _norm(path) -> str:
    path = str(path).rstrip("/")
    return path if "://" in path else os.path.normpath(path)


def selection_features(opts: TrainStage, stage: int) -> bytes | None:
    """The domain extractor's bytes that score the last stage (None: no selection, or
    Inception); missing weights are a :class:`ConfigError` naming them, before Ray starts."""
    if stage != opts.model.num_stages - 1 or opts.selection.every_images <= 0:
        return None
    return score_weights(opts.selection, "train.selection (set every_images: 0 for none)")


# --- the driver -------------------------------------------------------------------------------


def ray_train_settings(ray_opts: RayOptions) -> None:
    """Ray Train's own settings, in the environment that fit() reads when it creates its
    controller (which passes them on to the workers)."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(ray_opts.poll_interval_s)


class StageError(RuntimeError):
    """The stage produced no model (diverged past the rollback limit, or failed)."""


def run_stage(opts: TrainStage, stage: int, echo=_cli.say) -> dict:
    """Train stage ``stage`` on Ray and write its outputs; returns the metrics written."""
    import ray.train
    from ray.train.torch import TorchTrainer

    clock = {"start": time.time()}
    previous_url = opts.model_path(stage - 1) if stage else None
    cfg, previous, key = check_stage(
        opts.config(), stage, opts.data, opts.data_storage_options, opts.ray.workers, previous_url
    )
    features = selection_features(opts, stage)
    clock["checked"] = time.time()
    r = cfg.model.resolutions[stage]
    run_name = f"stage{stage}-{r}x{r}-{key}"
    place = ray_utils.place(opts.ray, opts.data, opts.data_storage_options, "train.ray.storage")
    clock["placed"] = time.time()
    run_url = cio.join(place.storage, run_name)
    echo(f"train: {place.connected}")
    echo(f"train: stage {stage} ({r}x{r}) on {place.nodes} node(s); checkpoints in {run_url}")
    params = {"train": public(opts), "stage": stage, "ray_run": run_name}
    tags = {"cfebm.stage": str(stage)}
    with tracking.stage_run(opts.mlflow, f"stage{stage}-{r}x{r}", run_name, params, tags) as track:
        if track:
            echo(f"train: MLflow {track.uri} run {track.run_id}" + " (continued)" * track.continued)
            if not track.continued:
                track.client.log_text(track.run_id, _cli.yaml_text(params["train"]), "config.yaml")
        job = {
            "options": opts,
            "stage": stage,
            "config": cfg,
            "data_url": place.data_url,
            "previous": previous,
            # The selection's feature extractor, as bytes: a worker on another node has no
            # copy of the driver's local files (the weights are small; Inception's come by URL).
            "features": features,
            "tracking_uri": track.uri if track else None,
            "run_id": track.run_id if track else None,
        }
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=job,
            scaling_config=ray.train.ScalingConfig(
                num_workers=opts.ray.workers,
                use_gpu=opts.ray.use_gpu,
                resources_per_worker=opts.ray.resources_per_worker,
                placement_strategy=opts.ray.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=place.storage_path,
                storage_filesystem=place.storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=opts.ray.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=opts.ray.keep_checkpoints),
                worker_runtime_env={"env_vars": ray_utils.worker_env()},
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        ray_train_settings(opts.ray)
        clock["fit"] = time.time()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise StageError(
                f"stage {stage} failed after train.ray.max_failures = {opts.ray.max_failures} "
                f"retries: {e}"
            ) from e
        summary = dict(result.return_value or {})
        if summary.get("status") == "config_error":
            raise ConfigError(summary["error"])
        if summary.get("status") == "diverged":
            raise StageError(summary.get("error") or f"stage {stage} diverged")
        if result.checkpoint is None:
            raise StageError(f"stage {stage} finished without a checkpoint in {run_name}")
        clock["fitted"] = time.time()
        with result.checkpoint.as_directory() as d:
            ckpt = load_checkpoint(os.path.join(d, TRAINER_FILE))
        metrics, pngs = write_stage_outputs(
            model_file(ckpt, cfg),
            summary,
            ckpt.get("history") or {},
            model_path=opts.model_path(stage),
            metrics_path=f"{opts.metrics}/train-stage{stage}.json",
            plots=opts.plots,
            sampler=opts.config().sampler,
            count=opts.samples.count,
            seed=opts.optim.seed + 2024,
        )
        clock["end"] = time.time()
        ids = {"ray_run": redact_url(run_url), "mlflow_run_id": track.run_id if track else None}
        info = run_record(summary, clock, **ids)
        cio.write_json(os.path.join(opts.stage_dir(stage), "run.json"), info)
        if track:
            c, run_id, step = track.client, track.run_id, metrics["step"]
            tracking.log_png(c, run_id, pngs["samples.png"], key="samples", step=step)
            for name, png in pngs.items():
                tracking.log_png(c, run_id, png, f"final/{name}")
            tracking.log_metrics(c, run_id, step, {"stage_seconds": info["fit_seconds"]})
            name = opts.registered_name() if stage == cfg.model.num_stages - 1 else None
            tracking.flush()
            from pipelines import serving  # (mlflow's model flavours: only where used)

            uri = serving.log_model(track.run_id, track.uri, opts.model_path(stage), name)
            echo(f"train: MLflow model {uri}" + (f", registered as {name}" if name else ""))
            track.results = metrics
    return metrics


# --- the workers ------------------------------------------------------------------------------


class RayHooks(MetricsLog):
    """Checkpoints into Ray Train's storage, metrics and sample grids to MLflow (rank 0),
    progress lines to the driver's console; the last stage's scores computed on rank 0 and
    shared with every rank (they decide the same)."""

    def __init__(self, job: dict, rank: int, world: int, scorer: Hooks | None = None):
        self.job, self.rank, self.world, self.scorer = job, rank, world, scorer
        self.opts: TrainStage = job["options"]
        self.run_id = job["run_id"]
        self.client = tracking.client(job["tracking_uri"]) if rank == 0 and self.run_id else None

    def line(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def log(self, step: int, values: dict) -> None:
        if self.client is not None:
            tracking.log_metrics(self.client, self.run_id, step, values)

    def after_step(self, t: Trainer, r, seconds: float) -> None:
        super().after_step(t, r, seconds)
        step, every, n = t.state.step, self.opts.samples.every, self.opts.samples.count
        if self.client is not None and every and step % every == 0:
            images = draw(t.model, t.cfg.sampler, n, seed=4242, beta=t.beta)
            grid = make_grid(images, scale=max(1, 32 // t.resolution))
            self.client.log_image(self.run_id, grid, key="samples", step=step)

    def evaluate(self, t: Trainer) -> dict | None:
        values = self.scorer.evaluate(t) if self.scorer is not None else None
        score = torch.tensor([values["score"] if values else 0.0], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.broadcast(score, src=0)
        return values or {"score": float(score[0])}

    def checkpoint(self, t: Trainer, info: dict) -> None:
        import ray.train

        # Every step so far is stored before Ray registers the checkpoint: a kill after
        # that resumes from it, and steps still queued in this process were lost for good.
        if self.client is not None:
            tracking.flush()
        with cio.report_dir("ckpt") as d:
            save_worker_checkpoint(d, t.state_dict(), self.rank, self.world)
            metrics = {k: v for k, v in info.items() if k != "name"}
            ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=info["name"])


def train_loop_per_worker(job: dict) -> dict:
    """Ray Train entry point: one worker's part of one stage (returns rank 0's summary)."""
    import ray.train
    import ray.train.torch

    logging.getLogger().setLevel(logging.WARNING)
    opts: TrainStage = job["options"]
    stage, cfg = job["stage"], job["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(opts.ray.threads_per_worker)
    device = ray.train.torch.get_device() if opts.ray.use_gpu else torch.device("cpu")
    last = stage == cfg.model.num_stages - 1 and opts.selection.every_images > 0

    def wrap(net):  # once beta reaches 1 the fade path is unused: DDP must not wait for it
        unused = {"find_unused_parameters": net.stage > 0}
        return ray.train.torch.prepare_model(net, parallel_strategy_kwargs=unused)

    state, exact = None, True
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state, exact = load_worker_checkpoint(d, rank, world)
    try:
        store = PyramidStore(job["data_url"], opts.data_storage_options)
        score = opts.selection if last and rank == 0 else None
        trainer, scorer, how = stage_worker(
            cfg, stage, store, rank, world, score=score, weights=job["features"],
            previous=job["previous"], state=state, exact=exact, device=device, wrap_model=wrap,
        )  # fmt: skip
    except (DataError, ConfigError, FeatureError) as e:  # deterministic: a retry fails again
        return {"status": "config_error", "error": str(e)}
    print(f"[rank {rank}/{world}] {how}", flush=True)
    loop = opts.loop
    if last:
        r = cfg.model.resolutions[stage]
        every = max(1, opts.selection.every_images // cfg.train.batch_for(r))
        loop = replace(loop, evaluate_every=every, keep_best=True)
    hooks = [RayHooks(job, rank, world, scorer), *opts.debug.hooks()]
    summary = train_stage(trainer, loop, hooks, resumed=checkpoint is not None)
    return {**asdict(summary), "world_size": world}


def _done(opts: TrainStage, m: dict) -> str:
    s = m["stage"]
    return (
        f"stage {s} done: step {m['step']}, {m['stage_images']} images, loss {m['loss']}, "
        f"{m['rollbacks']} rollback(s); wrote {opts.stage_dir(s)} and "
        f"{opts.metrics}/train-stage{s}.json"
    )


main = _cli.stage_main(
    TrainStage,
    "train",
    lambda opts, extra: run_stage(opts, extra.stage),
    __doc__,
    _done,
    arguments=lambda p: p.add_argument(
        "--stage", type=int, required=True, help="stage index s (0 = coarsest)"
    ),
    settings=lambda opts, extra: {"stage": extra.stage, **public(opts)},
    errors=(StageError,),
)


if __name__ == "__main__":
    _cli.script(main)
