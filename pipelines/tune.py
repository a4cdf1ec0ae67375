"""DVC stage ``tune``: Ray Tune search of the Langevin sampler, with ASHA early stopping.

    python -m pipelines.tune [--params params.yaml] [--num_samples 8] [...] [--dry-run]

Each trial trains one coarse-to-fine stage (``tune.stage``; a later stage starts from
``tune.warm_start``) with its own ``step_size`` / ``noise_start`` (optionally ``steps``) for
``train_steps`` steps of cfebm's training loop, the network, base sampler and optimiser
being ``train.model`` / ``train.sampler`` / ``train.optim`` (with ``tune.optim`` over it).
Every ``eval_every`` steps it scores samples of its chain by KID or FID in the feature space
of the ``features`` stage's domain CNN (or Inception) and reports the score with a
checkpoint; ASHA stops trials that score badly at a rung.

Resuming: the experiment lives in ``<tune.ray.storage>/tune-stage<s>-<r>x<r>-<key>`` (``<key>``
hashes the settings and inputs), outside DVC's outputs; running the stage again restores
it: finished trials are kept, interrupted ones continue from their last checkpoint.
MLflow: a nested ``tune`` run with one nested run per trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cfebm import io as cio
from cfebm.checkpoint import TRAINER_FILE, load_checkpoint, save_checkpoint
from cfebm.config import CFEBMConfig, ConfigError, ScoreConfig
from cfebm.data import PyramidStore
from cfebm.data.store import dataset_key
from cfebm.loop import LoopConfig, MetricsLog, train_stage
from cfebm.redact import public, redact_url
from cfebm.search import (
    DIVERGED_SCORE,
    Asha,
    SearchSpace,
    TrialSummary,
    TuneError,
    describe,
    pick_best,
    search_result,
    trial_lines,
    trial_summary,
    with_sampler,
)
from cfebm.stage import score_weights, stage_worker
from pipelines import _cli, ray_utils, tracking

TRIAL_TAG, OUTCOME_TAG = "cfebm.tune.trial", "cfebm.tune.outcome"
SAMPLES_FILE, SCORES_FILE = "samples.png", "scores.json"


# --- options ----------------------------------------------------------------------------------


@dataclass
class TuneRay(ray_utils.ClusterOptions):
    """Where the search runs; ``storage`` holds its experiments (outside DVC's outputs).
    ``keep_checkpoints`` is per trial, null (all) by default: after a kill, Tune's last
    saved state may name an older checkpoint, which must still exist."""

    storage: str = "runs/tune"
    max_failures: int = 1
    keep_checkpoints: int | None = None
    cpus_per_trial: float = 1.0
    """Ray CPUs of each trial; also its torch threads."""
    state_every_s: float | None = 5.0
    """Seconds between saves of Tune's experiment state (TUNE_GLOBAL_CHECKPOINT_S); null:
    Ray's default."""
    verbose: int = 0
    """Ray Tune's own console tables: 0 none, 1 status updates, 2 every result."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.cpus_per_trial > 0 or self.verbose not in (0, 1, 2):
            raise ConfigError("tune.ray: cpus_per_trial must be > 0 and verbose 0, 1 or 2")


@dataclass
class TuneStage:
    """Ray Tune search of the Langevin sampler (params.yaml section ``tune``)."""

    stage: int = 0
    """The coarse-to-fine stage the trials train (0: the coarsest resolution)."""
    warm_start: str | None = None
    """Stage > 0: the model of stage - 1 that every trial starts from."""
    data: str = "data/pyramid"
    """The pyramid dataset root: training images and the score's reference."""
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    score: ScoreConfig = field(
        default_factory=lambda: ScoreConfig(
            "kid", num_samples=256, num_reference=512, kid_subsets=50, kid_subset_size=256
        )
    )
    """The score that ASHA and the choice of the best minimise (KID: reliable with few
    samples), of the same seeded chains in every trial (common random numbers)."""
    train_steps: int = 80
    """Training steps of a trial that is not stopped early."""
    eval_every: int = 20
    """Steps between scores (each a Tune report with a trial checkpoint)."""
    num_samples: int = 4
    """Trials (with grid values: repetitions of the grid), the baseline included."""
    max_concurrent_trials: int = 2
    time_budget_s: float | None = 600.0
    """Wall-clock budget of one run of the search (null: none)."""
    include_baseline: bool = True
    """Make the first trial the current ``train.sampler`` setting (when in the space)."""
    seed: int = 0
    space: SearchSpace = field(default_factory=SearchSpace)
    asha: Asha = field(default_factory=Asha)
    optim: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``train.optim`` for the trials."""
    out: str = "tune/best.json"
    """The best sampler setting (what ``train.sampler_from_tune`` reads) and every trial's
    outcome."""
    metrics: str = "metrics/tune.json"
    ray: TuneRay = field(default_factory=TuneRay)
    mlflow: tracking.TrackingOptions = field(default_factory=tracking.TrackingOptions)
    report_delay_s: float = 0.0
    """Seconds a trial waits after each report (lets a test interrupt a trial mid-way)."""

    def __post_init__(self) -> None:
        for name in ("train_steps", "eval_every", "num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every > self.train_steps:
            raise ConfigError("tune.eval_every must not exceed tune.train_steps")
        if self.stage > 0 and not self.warm_start:
            raise ConfigError(
                f"tune.stage {self.stage} trains from stage {self.stage - 1}'s model: set "
                "tune.warm_start to its file (e.g. models/stage0/model.pt)"
            )


def base_config(p: TuneStage, train) -> CFEBMConfig:
    """The trials' cfebm config: the train section's, ``tune.optim`` over its optimiser."""
    try:
        optim = dataclasses.replace(train.optim, **p.optim)
    except TypeError as e:
        raise ConfigError(f"tune.optim: {e}") from None
    cfg = CFEBMConfig(train.model, train.sampler, optim)
    if p.stage >= cfg.model.num_stages:
        raise ConfigError(f"tune.stage {p.stage}: train.model has {cfg.model.num_stages} stages")
    return cfg


# --- one trial --------------------------------------------------------------------------------


class TrialReports(MetricsLog):
    """A trial's reports: every evaluation (of ``scorer``) is a Tune result with a
    checkpoint; curves and sample grids go to the trial's MLflow run."""

    def __init__(self, p: TuneStage, trial_id: str, setting: dict, scores: list, scorer):
        self.p, self.trial_id, self.scores, self.scorer = p, trial_id, scores, scorer
        self.where = describe(setting)
        self.client = self.run_id = None

    def log(self, step: int, values: dict) -> None:
        if self.client:
            tracking.log_metrics(self.client, self.run_id, step, values)

    def event(self, name: str, info: dict) -> None:
        super().event(name, info)
        if name == "resumed":
            print(f"tune: trial {self.trial_id} ({self.where}) resumed at step {info['step']}")

    def checkpoint(self, t, info: dict) -> None:
        import ray.tune

        from cfebm.images import grid_png

        step, values, loss = t.state.step, self.scorer.values, info.get("loss", math.nan)
        score = values[self.scorer.key]
        print(
            f"tune: trial {self.trial_id} ({self.where}) step {step}/{self.p.train_steps}: "
            f"{self.scorer.key} {score:.4g}, loss {loss:+.4f}",
            flush=True,
        )
        png = grid_png(self.scorer.samples[:64], scale=max(1, 32 // t.resolution))
        if self.client:
            tracking.log_png(self.client, self.run_id, png, key="samples", step=step)
            tracking.flush()
        self.scores.append([step, score])
        report = {"step": step, "score": score, **values, "loss": loss, "beta": t.beta}
        with cio.report_dir("tune") as d:
            save_checkpoint(t.state_dict(), os.path.join(d, TRAINER_FILE))
            cio.write_bytes(os.path.join(d, SAMPLES_FILE), png)
            cio.write_bytes(os.path.join(d, SCORES_FILE), json.dumps(self.scores).encode())
            ray.tune.report(report, checkpoint=ray.tune.Checkpoint.from_directory(d))
        if self.p.report_delay_s:
            time.sleep(self.p.report_delay_s)


def _open_trial_run(job: dict, trial_id: str, setting: dict) -> tuple:
    """(client, run id) of the trial's MLflow run under the tune run, continued when the
    trial resumes; (None, None) without MLflow."""
    if not job.get("tune_run_id"):
        return None, None
    from mlflow.entities import Param

    c = tracking.client(job["tracking_uri"])
    tag = f"{job['experiment']}/{trial_id}"
    found = tracking.find_run(c, job["experiment_id"], TRIAL_TAG, tag)
    if found:
        c.update_run(found.info.run_id, status="RUNNING")  # its own attempt, not finished
        return c, found.info.run_id
    tags = {
        "mlflow.parentRunId": job["tune_run_id"],
        tracking.KIND_TAG: "trial",
        "cfebm.stage": "tune",
        TRIAL_TAG: tag,
    }
    run_id = c.create_run(job["experiment_id"], run_name=f"trial-{trial_id}", tags=tags).info.run_id
    params = {**setting, "stage": job["options"].stage, "trial_id": trial_id}
    c.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return c, run_id


def run_trial(config: dict, job: dict) -> None:
    """Tune function trainable: train the stage with the sampler setting ``config`` through
    cfebm's loop and report the score every ``eval_every`` steps."""
    import ray.tune

    p: TuneStage = job["options"]
    torch.set_num_threads(max(1, int(p.ray.cpus_per_trial)))
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = with_sampler(job["config"], config)
    state, scores = None, []
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(os.path.join(d, TRAINER_FILE))
            scores = json.loads(cio.read_bytes(os.path.join(d, SCORES_FILE)))
    store = PyramidStore(job["data_url"], p.data_storage_options)
    trainer, scorer, _ = stage_worker(
        cfg, p.stage, store, score=p.score, weights=job["features"], previous=job["previous"],
        state=state,
    )  # fmt: skip
    reports = TrialReports(p, trial_id, dict(config), scores, scorer)
    try:
        reports.client, reports.run_id = _open_trial_run(job, trial_id, dict(config))
    except Exception as e:  # the tracking server is not worth a trial
        print(f"warning: trial {trial_id}: no MLflow run ({type(e).__name__}: {e})", flush=True)
    loop = LoopConfig(
        checkpoint_every=p.eval_every,
        evaluate_every=p.eval_every,
        max_rollbacks=0,
        progress_every_s=math.inf,
    )
    left = p.train_steps - trainer.state.step
    summary = train_stage(
        trainer, loop, [scorer, reports], max_steps=left, resumed=checkpoint is not None
    )
    if summary.status == "diverged":
        # A setting that diverges is a bad setting: rolling it back would only hide that.
        reports.log(summary.step + 1, {"diverged": 1})
        ray.tune.report({"step": summary.step + 1, "score": DIVERGED_SCORE, "diverged": 1})


# --- the search -------------------------------------------------------------------------------


def _resumable_asha(**kw):
    """ASHA whose rungs survive ``Tuner.restore``: the scores stored in each restored
    trial's checkpoint (``scores.json``) are replayed into its bracket, so that stopping
    goes on as if the search had never been interrupted (a restored ASHAScheduler starts
    with empty rungs)."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def on_trial_add(self, tune_controller, trial) -> None:
            super().on_trial_add(tune_controller, trial)
            ckpt = getattr(trial, "checkpoint", None)
            if ckpt is None:
                return
            try:
                with ckpt.filesystem.open_input_stream(
                    f"{ckpt.path.rstrip('/')}/{SCORES_FILE}"
                ) as f:
                    history = json.loads(f.readall())
            except (OSError, ValueError):
                return
            for step, score in history:
                if step < self._max_t:
                    self._trial_info[trial.trial_id].on_result(trial, step, self._metric_op * score)

    return ResumableASHA(**kw)


def param_space(space: SearchSpace) -> dict:
    from ray import tune

    out = {}
    for name, dim in space.dimensions().items():
        if dim.values is not None:
            values = [int(v) for v in dim.values] if name == "steps" else list(dim.values)
            out[name] = tune.grid_search(values) if dim.grid else tune.choice(values)
        elif name == "steps":
            rnd = tune.lograndint if dim.log else tune.randint
            out[name] = rnd(int(dim.low), int(dim.high) + 1)
        else:
            out[name] = (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)
    return out


def _trial_id(result) -> str:
    return os.path.basename(str(result.path)).removeprefix("trial-")


def summarize(grid, p: TuneStage) -> list[TrialSummary]:
    """Every trial's outcome: completed (all train_steps), stopped_early (by ASHA or the
    time budget, after a score), diverged, error, not_run."""
    out = [
        trial_summary(
            _trial_id(result),
            result.config or {},
            result.metrics or {},
            None if result.error is None else str(result.error),
            p.train_steps,
            p.score.metric,
        )
        for result in grid
    ]
    return sorted(out, key=lambda t: str(t.trial_id))


NOT_IN_KEY = (
    "out",
    "metrics",
    "mlflow",
    "report_delay_s",
    "data",
    "warm_start",
    "data_storage_options",
)
"""TuneStage fields that a search's result does not depend on (where things are, how the
run is logged and paced; the inputs' contents are keyed apart)."""


def experiment_key(p: TuneStage, cfg: CFEBMConfig, inputs: dict) -> str:
    """A hash of what the search's result depends on: the same settings and inputs restore
    the experiment, others start a new one."""
    d = dataclasses.asdict(p)
    tune = {k: v for k, v in d.items() if k not in NOT_IN_KEY}
    tune["score"].pop("features")
    tune["ray"] = {"cpus_per_trial": p.ray.cpus_per_trial}  # threads change the numbers slightly
    return cio.content_key({"tune": tune, "config": dataclasses.asdict(cfg), "inputs": inputs})


def run_tune(p: TuneStage, cfg: CFEBMConfig, echo=_cli.say) -> dict:
    """Run (or continue) the search; write the best setting and the metrics; return them."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every trial's score line matters
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cfebm.trainer import load_previous_stage

    t0 = time.time()
    store = PyramidStore(p.data, p.data_storage_options)
    cfg = dataclasses.replace(cfg, model=cfg.model.with_channels(store.channels))
    r = cfg.model.resolutions[p.stage]
    inputs = {"dataset": dataset_key(p.data, p.data_storage_options)}
    previous = None
    if p.stage > 0:
        previous, inputs["warm_start"] = load_previous_stage(p.warm_start, cfg.model, p.stage)
    features = score_weights(p.score, "tune.score")
    if features is not None:
        inputs["features"] = hashlib.sha256(features).hexdigest()
    name = f"tune-stage{p.stage}-{r}x{r}-{experiment_key(p, cfg, inputs)}"

    place = ray_utils.place(p.ray, p.data, p.data_storage_options, "tune.ray.storage")
    echo(f"tune: {place.connected}")
    exp_path = cio.join(place.storage_path, name)
    restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=place.storage_fs)
    baseline = {n: getattr(cfg.sampler, n) for n in p.space.dimensions()}
    job = {
        "options": p,
        "config": cfg,
        "data_url": place.data_url,
        "previous": previous,
        "features": features,
        "experiment": name,
    }
    params, tags = {"tune": public(p)}, {"cfebm.stage": "tune"}
    with tracking.stage_run(p.mlflow, f"tune-stage{p.stage}", name, params, tags) as track:
        if track:
            ids = {"experiment_id": track.experiment_id, "tune_run_id": track.run_id}
            job.update(tracking_uri=track.uri, **ids)
            echo(f"tune: MLflow {track.uri} run {track.run_id}" + " (continued)" * track.continued)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, job=job), {"cpu": p.ray.cpus_per_trial}
        )
        if restoring:
            echo(f"tune: restoring the experiment in {exp_path} (finished trials are kept)")
            tuner = tune.Tuner.restore(
                exp_path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=place.storage_fs,
            )
        else:
            inside = all(d.contains(baseline[n]) for n, d in p.space.dimensions().items())
            first = [baseline] if p.include_baseline and inside else None
            scheduler = FIFOScheduler()
            if p.asha.enabled:
                scheduler = _resumable_asha(
                    time_attr="step",
                    max_t=p.train_steps,
                    grace_period=min(p.asha.grace_steps, p.train_steps),
                    reduction_factor=p.asha.reduction_factor,
                )
            echo(
                f"tune: new experiment {exp_path}: {p.num_samples} trial(s) of stage {p.stage} "
                f"({r}x{r}), {p.max_concurrent_trials} at a time; "
                + ", ".join(f"{n} {d.describe()}" for n, d in p.space.dimensions().items())
            )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(p.space),
                tune_config=tune.TuneConfig(
                    metric="score",
                    mode="min",
                    scheduler=scheduler,
                    search_alg=BasicVariantGenerator(
                        points_to_evaluate=first,
                        max_concurrent=p.max_concurrent_trials,
                        random_state=p.seed,
                    ),
                    num_samples=p.num_samples,
                    time_budget_s=p.time_budget_s,
                    reuse_actors=True,
                    trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=place.storage_path,
                    storage_filesystem=place.storage_fs,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=p.ray.keep_checkpoints),
                    failure_config=tune.FailureConfig(max_failures=p.ray.max_failures),
                    verbose=p.ray.verbose,
                ),
            )
        if p.ray.state_every_s is not None:  # read by Tune's controller when fit() starts
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(p.ray.state_every_s)
        # On Ctrl-C Tune would end "gracefully" and return partial results as if finished;
        # a KeyboardInterrupt instead leaves no outputs and the next run restores the search.
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        t_fit = time.time()
        grid = tuner.fit()
        if grid.num_terminated + grid.num_errors < len(grid):
            raise KeyboardInterrupt(
                f"tune: interrupted; run the stage again to continue {exp_path}"
            )
        trials = summarize(grid, p)
        best = pick_best(trials)
        result, metrics = search_result(trials, best, baseline, p.score.metric)
        result.update(stage=p.stage, resolution=r, experiment=redact_url(exp_path))
        metrics["restored"] = restoring
        cio.write_json(p.out, result)
        cio.write_json(p.metrics, metrics)
        if track:
            log_results(track, job, trials, best, grid, result, metrics, time.time() - t_fit)
            track.results = metrics
    for line in trial_lines(trials, best):
        echo(f"tune:{line}")
    echo(f"tune: {time.time() - t0:.0f} s")
    return result


def log_results(track, job, trials, best, grid, result, metrics, fit_seconds) -> None:
    """Close every trial's run with its outcome; the result on the tune run."""
    c = track.client
    for t in trials:
        found = tracking.find_run(
            c, track.experiment_id, TRIAL_TAG, f"{job['experiment']}/{t.trial_id}"
        )
        if found:
            c.set_tag(found.info.run_id, OUTCOME_TAG, t.outcome)
            c.set_terminated(found.info.run_id, "FAILED" if t.outcome == "error" else "FINISHED")
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    tracking.log_metrics(c, track.run_id, 0, {**numbers, "fit_seconds": fit_seconds})
    c.set_tag(track.run_id, "cfebm.tune.best_trial", str(best.trial_id))
    c.log_text(track.run_id, json.dumps(result, indent=2), "tune/best.json")
    for res in grid:
        if _trial_id(res) == best.trial_id and res.checkpoint is not None:
            with res.checkpoint.as_directory() as d:
                if os.path.exists(os.path.join(d, SAMPLES_FILE)):
                    png = cio.read_bytes(os.path.join(d, SAMPLES_FILE))
                    tracking.log_png(c, track.run_id, png, "tune/best_samples.png")


def _config(p: TuneStage, extra) -> CFEBMConfig:
    from pipelines.train import TrainStage

    return base_config(p, TrainStage.read(extra.params))


def _run(p: TuneStage, extra) -> dict:
    try:
        return run_tune(p, _config(p, extra))
    except KeyboardInterrupt as e:
        sys.exit(str(e) or "tune: interrupted; run the stage again to continue")


def _done(p: TuneStage, best: dict) -> str:
    return (
        f"best {describe(best['sampler'])}: {best['metric_key']} {best['score']:.4g} at "
        f"step {best['step']} (trial {best['trial_id']}); wrote {p.out} and {p.metrics}"
    )


main = _cli.stage_main(
    TuneStage,
    "tune",
    _run,
    __doc__,
    _done,
    settings=lambda p, extra: {
        **public(p),
        "base_config": dataclasses.asdict(_config(p, extra)),
    },
    errors=(TuneError,),
)


if __name__ == "__main__":
    _cli.script(main)
