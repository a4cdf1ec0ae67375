"""What one Ray Tune trial of the ``tune`` stage runs: a short training of one stage.

:func:`run_trial` is a Tune *function trainable* (Ray 2.60 runs Ray Train "V2", where a
``TorchTrainer`` can no longer be handed to a ``Tuner``; a trial of a 4x4 stage is also far
too small to be worth data parallelism, so Tune's parallelism is across trials). It builds
a :class:`cfebm.trainer.Trainer` for the stage with the trial's sampler setting, trains it
for ``train_steps`` steps, and every ``eval_every`` steps draws samples from the model's
coarse-to-fine chain and scores them (KID or FID, :mod:`cfebm.metrics`) against the data.
Each score is reported to Tune with a checkpoint of the whole trainer state, so that ASHA
can stop the trial there and an interrupted search resumes the trial where it stopped.

A diverged step (NaN, runaway energies) ends the trial with the score
:data:`DIVERGED_SCORE`: a setting that diverges is a bad setting, and rolling it back (as
the training stages do) would only hide that.

MLflow: the trial logs its own curves (loss, energies every ``log_every`` steps; scores
and sample grids at each evaluation) into a run nested under the stage's ``tune`` run,
found again by the tag ``cfebm.tune.trial`` when the trial is resumed. The driver sets the
trial runs' final status, since a trial that ASHA stops never gets to.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cfebm.checkpoint import load_checkpoint, save_checkpoint
from cfebm.config import CFEBMConfig, from_dict
from cfebm.data import PyramidStore
from cfebm.images import grid_png
from cfebm.metrics import (
    FID,
    INCEPTION,
    KID_MEAN,
    Extractor,
    MetricsConfig,
    compute_metrics,
    domain_extractor,
    inception_extractor,
    metric_key,
)
from cfebm.model import EnergyNet, warm_start
from cfebm.trainer import Trainer, model_from_checkpoint
from pipelines.evaluate import draw_samples, reference_images
from pipelines.tune_params import with_sampler

TRAINER_FILE = "trainer.pt"
SAMPLES_FILE = "samples.png"
SCORES_FILE = "scores.json"
"""``[[step, score], ...]``: every score the trial reported up to its checkpoint, so that a
restored search can rebuild ASHA's rungs (pipelines.tune.ResumableASHA)."""
DIVERGED_SCORE = 1.0e6
"""The score of a trial whose training diverged: worse than any real KID or FID."""
TRIAL_TAG = "cfebm.tune.trial"
"""MLflow tag of a trial's run: ``<experiment name>/<trial id>``."""
OUTCOME_TAG = "cfebm.tune.outcome"


@dataclass
class TrialJob:
    """Everything a trial needs besides its sampler setting (plain data, sent once through
    Ray's object store to every trial, wherever it runs)."""

    experiment: str
    """The Tune experiment name (also part of the MLflow trial tags)."""
    stage: int
    config: dict
    """The base cfebm config (``cfebm.config.to_dict``); the trial overrides its sampler."""
    data_url: str
    data_options: dict = field(default_factory=dict)
    split: str = "train"
    warm_start: bytes | None = None
    """Stage > 0: the previous stage's model (a cfebm checkpoint)."""
    extractor: str = "domain"
    features: bytes | None = None
    """The domain extractor's weights file (extractor ``domain``)."""
    inception_weights: str | None = None
    metric: str = "kid"
    train_steps: int = 80
    eval_every: int = 20
    eval_samples: int = 256
    num_reference: int | None = 512
    kid_subsets: int = 50
    kid_subset_size: int = 256
    seed: int = 0
    threads: int = 1
    tracking_uri: str | None = None
    experiment_id: str | None = None
    tune_run_id: str | None = None
    """The stage's MLflow ``tune`` run, parent of the trial runs (None: no MLflow)."""
    log_every: int = 1
    report_delay_s: float = 0.0
    """TEST HOOK (tune.debug.report_delay_s)."""

    @property
    def cfg(self) -> CFEBMConfig:
        return from_dict(self.config)


def echo(line: str) -> None:
    """One line from a trial (Ray forwards it to the driver's console)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- scoring -----------------------------------------------------------------------------


def local_weights(data: bytes) -> str:
    """A local file holding ``data`` (the extractor weights), written once per machine."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"cfebm-features-{digest}.pt")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".cfebm-features-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def build_extractor(job: TrialJob) -> Extractor:
    if job.extractor == INCEPTION:
        return inception_extractor(job.inception_weights)
    if job.features is None:
        raise ValueError("the domain extractor needs its weights (tune.features)")
    return domain_extractor(local_weights(job.features))


def score_key(job: TrialJob, extractor: Extractor) -> str:
    """The metric key of the score, e.g. ``kid_mean_cfebm-digits-cnn``."""
    return metric_key(KID_MEAN if job.metric == "kid" else FID, extractor.label)


def evaluate(
    trainer: Trainer, job: TrialJob, reference: np.ndarray, extractor: Extractor
) -> tuple[dict[str, float], np.ndarray]:
    """(KID/FID of ``eval_samples`` samples of the current model, the samples).

    The chains are seeded by ``job.seed`` only, so every trial and every evaluation starts
    from the same noise (common random numbers): scores differ by the setting, not by luck.
    """
    cfg = trainer.cfg
    n = job.eval_samples
    samples = draw_samples(
        trainer.model, cfg.sampler, n, min(n, 256), job.seed, trainer.beta, torch.float32
    )
    metrics_cfg = MetricsConfig(
        fid=job.metric == "fid",
        kid=True,
        prc=False,
        kid_subsets=job.kid_subsets,
        kid_subset_size=job.kid_subset_size,
        seed=job.seed,
    )
    return compute_metrics(samples, reference, extractor, metrics_cfg), samples


# --- MLflow ------------------------------------------------------------------------------


def trial_tag(experiment: str, trial_id: str) -> str:
    return f"{experiment}/{trial_id}"


def find_trial_run(client, experiment_id: str, tag: str) -> str | None:
    """The MLflow run of a trial (by its ``cfebm.tune.trial`` tag), or None."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{tag}'", max_results=1
    )
    return found[0].info.run_id if found else None


def open_trial_run(job: TrialJob, trial_id: str, setting: dict) -> tuple[str, bool] | None:
    """``(run_id, continued)`` of this trial's MLflow run, nested under the ``tune`` run;
    a resumed trial continues its run. None without MLflow."""
    if not (job.tracking_uri and job.tune_run_id and job.experiment_id):
        return None
    from mlflow.entities import Param

    from pipelines.tracking import client as mlflow_client

    c = mlflow_client(job.tracking_uri)
    tag = trial_tag(job.experiment, trial_id)
    run_id = find_trial_run(c, job.experiment_id, tag)
    if run_id is not None:
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(
        job.experiment_id,
        run_name=f"trial-{trial_id}",
        tags={
            "mlflow.parentRunId": job.tune_run_id,
            "cfebm.kind": "trial",
            "cfebm.stage": "tune",
            TRIAL_TAG: tag,
        },
    )
    params = {**{k: str(v) for k, v in setting.items()}, "stage": str(job.stage)}
    params["trial_id"] = trial_id
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id, False


# --- the trial ---------------------------------------------------------------------------


def initial_model(job: TrialJob, cfg: CFEBMConfig) -> EnergyNet | None:
    """Stage 0: None (the Trainer builds a fresh network); stage s: stage s-1's model grown
    by one stage (every earlier stage energy kept, as the training stage does)."""
    if job.stage == 0:
        return None
    prev = model_from_checkpoint(
        torch.load(io.BytesIO(job.warm_start), map_location="cpu", weights_only=True)
    )
    if prev.stage != job.stage - 1:
        raise ValueError(f"tune.warm_start holds a stage-{prev.stage} model, not {job.stage - 1}")
    torch.manual_seed(cfg.train.seed + job.stage)
    return warm_start(prev)


def load_images(job: TrialJob, resolution: int) -> tuple[torch.Tensor, np.ndarray]:
    """(training images [N, C, r, r] in the [0, 255] scale, uint8 reference images)."""
    store = PyramidStore(job.data_url, job.data_options)
    train = torch.from_numpy(np.array(store.read("train", resolution)))
    reference = reference_images(store, job.split, resolution, job.num_reference, job.seed)
    return train, reference


def run_trial(config: dict, job: TrialJob) -> None:
    """Tune function trainable: train the stage with the sampler setting ``config`` and
    report the score every ``eval_every`` steps (see the module docstring)."""
    import ray.tune

    from pipelines.pictures import grid
    from pipelines.tracking import RunLogger

    # One INFO line per checkpoint would drown the trials' own progress lines.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    torch.set_num_threads(job.threads)
    trial_id = ray.tune.get_context().get_trial_id()
    setting = dict(config)
    cfg = with_sampler(job.cfg, setting)
    resolution = cfg.model.resolutions[job.stage]
    images, reference = load_images(job, resolution)
    extractor = build_extractor(job)
    key = score_key(job, extractor)

    trainer = Trainer(cfg, {resolution: images}, model=initial_model(job, cfg))
    resumed_from = None
    scores: list[list[float]] = []
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_state_dict(load_checkpoint(os.path.join(d, TRAINER_FILE)))
            with open(os.path.join(d, SCORES_FILE)) as f:
                scores = json.load(f)
        resumed_from = trainer.state.step

    try:
        opened = open_trial_run(job, trial_id, setting)
    except Exception as e:  # the tracking server is not worth a trial: train on without it
        echo(f"warning: trial {trial_id}: no MLflow run ({type(e).__name__}: {e})")
        opened = None
    logger = RunLogger(job.tracking_uri, opened[0]) if opened else None
    where = ", ".join(f"{k} {v:.4g}" for k, v in setting.items())
    if resumed_from is not None:
        echo(f"tune: trial {trial_id} ({where}) resumed at step {resumed_from}")
        if logger:
            logger.metrics(resumed_from, {"resumed_from_step": resumed_from})

    t0 = time.monotonic()
    while trainer.state.step < job.train_steps:
        result = trainer.step()
        step = trainer.state.step
        if result.diverged is not None:
            echo(f"tune: trial {trial_id} ({where}) diverged at step {step + 1}: {result.diverged}")
            if logger:
                logger.metrics(step + 1, {"diverged": 1})
                logger.flush()
            ray.tune.report({"step": step + 1, "score": DIVERGED_SCORE, "diverged": 1})
            return
        if logger and step % job.log_every == 0:
            logger.metrics(
                step,
                {
                    "loss": result.loss,
                    "energy_data": result.e_data,
                    "energy_sample": result.e_sample,
                    "grad_norm": result.grad_norm,
                },
            )
        if step % job.eval_every and step < job.train_steps:
            continue
        values, samples = evaluate(trainer, job, reference, extractor)
        score = values[key]
        report = {
            "step": step,
            "score": score,
            **values,
            "loss": result.loss,
            "energy_data": result.e_data,
            "energy_sample": result.e_sample,
            "beta": trainer.beta,
            "diverged": 0,
            "train_seconds": time.monotonic() - t0,
        }
        echo(
            f"tune: trial {trial_id} ({where}) step {step}/{job.train_steps}: {key} {score:.4g}"
            f", loss {result.loss:+.4f}"
        )
        png = grid_png(samples[:64], scale=max(1, 32 // resolution))
        if logger:
            logger.metrics(step, {**values, "score": score})
            logger.image(grid(samples[:64], scale=max(1, 32 // resolution)), "samples", step)
            logger.flush()
        scores.append([step, score])
        with tempfile.TemporaryDirectory(prefix="cfebm-tune-") as d:
            save_checkpoint(trainer.state_dict(), os.path.join(d, TRAINER_FILE))
            with open(os.path.join(d, SAMPLES_FILE), "wb") as f:
                f.write(png)
            with open(os.path.join(d, SCORES_FILE), "w") as f:
                json.dump(scores, f)
            ray.tune.report(report, checkpoint=ray.tune.Checkpoint.from_directory(d))
        if job.report_delay_s:
            time.sleep(job.report_delay_s)
