"""DVC stage ``tune``: Ray Tune search of the Langevin sampler, with ASHA early stopping.

    python -m pipelines.tune [--params params.yaml] [--num-samples N] [...] [--dry-run]

Each trial trains one coarse-to-fine stage (``tune.stage``, by default stage 0 at the
coarsest resolution; a later stage starts from ``tune.warm_start``) for ``train_steps``
steps with its own ``step_size`` / ``noise_start`` (and optionally ``steps``), and every
``eval_every`` steps scores samples of its chain by KID or FID in the feature space of the
``features`` stage's domain CNN (or Inception). ASHA stops trials that score badly at a
rung. ``num_samples`` trials, ``max_concurrent_trials`` at a time, within
``time_budget_s``; each trial a Tune function trainable (pipelines/tune_trial.py).

Resuming: the Tune experiment lives in ``<tune.storage>/tune-stage<s>-<r>x<r>-<key>``,
outside DVC's outputs, where ``<key>`` hashes the settings and inputs. Running the stage
again after an interruption restores that experiment (``Tuner.restore``): finished trials
are kept, interrupted ones continue from their last checkpoint, unstarted ones start.

Outputs: ``tune.out`` (default tune/best.json, a DVC out: the best sampler setting, read by
the training stages when ``train.sampler_from_tune`` points at it, and every trial's
outcome) and ``tune.metrics`` (DVC metrics). MLflow: a nested ``tune`` run of the pipeline
run with one nested run per trial (curves, scores, sample grids).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from cfebm import io as cio
from cfebm.checkpoint import load_checkpoint
from cfebm.config import CFEBMConfig, ConfigError, from_dict, to_dict
from cfebm.data import DataError
from cfebm.features import FeatureError
from cfebm.metrics import InceptionWeightsError
from pipelines import ray_utils
from pipelines._params import apply_overrides, load_section, nullable, params_argument
from pipelines.tune_params import (
    SECTION,
    Dimension,
    SearchSpace,
    TuneParams,
    baseline_point,
    experiment_key,
    params_from_dict,
    trial_base_config,
)
from pipelines.tune_trial import (
    DIVERGED_SCORE,
    OUTCOME_TAG,
    SAMPLES_FILE,
    TrialJob,
    find_trial_run,
    run_trial,
    trial_tag,
)

# Command-line options and the params key each overrides (None: top level of the section).
OVERRIDES = {
    "stage": (None, "stage"),
    "warm_start": (None, "warm_start"),
    "data": (None, "data"),
    "features": (None, "features"),
    "metric": (None, "metric"),
    "num_samples": (None, "num_samples"),
    "max_concurrent_trials": (None, "max_concurrent_trials"),
    "time_budget_s": (None, "time_budget_s"),
    "train_steps": (None, "train_steps"),
    "eval_every": (None, "eval_every"),
    "seed": (None, "seed"),
    "storage": (None, "storage"),
    "out": (None, "out"),
    "metrics": (None, "metrics"),
    "ray_address": ("ray", "address"),
    "local_cpus": ("ray", "local_cpus"),
    "cpus_per_trial": ("ray", "cpus_per_trial"),
    "mlflow": ("mlflow", "enabled"),
    "tracking_uri": ("mlflow", "tracking_uri"),
    "experiment": ("mlflow", "experiment"),
}

OUTCOMES = ("completed", "stopped_early", "diverged", "error", "not_run")


class TuneError(RuntimeError):
    """The search produced no usable setting (every trial failed or diverged)."""


def build_parser() -> argparse.ArgumentParser:
    d = TuneParams()
    p = argparse.ArgumentParser(
        prog="python -m pipelines.tune",
        description=__doc__.split("\n\n")[0],
        epilog="Every other setting is in section 'tune' of params.yaml (pipelines/tune_params.py "
        "documents each); the network, base sampler and optimiser are train.model, "
        "train.sampler and train.optim. Values in [brackets] are the built-in defaults.",
    )
    params_argument(p)
    p.add_argument("--stage", type=int, help=f"stage the trials train, 0 = coarsest [{d.stage}]")
    p.add_argument(
        "--warm-start",
        type=nullable,
        help="stage > 0: checkpoint of stage - 1 that every trial starts from [none]",
    )
    p.add_argument("--data", help=f"pyramid dataset root, path or URL [{d.data}]")
    p.add_argument("--features", help=f"domain extractor weights, path or URL [{d.features}]")
    p.add_argument("--metric", choices=("kid", "fid"), help=f"score to minimise [{d.metric}]")
    p.add_argument("--num-samples", type=int, help=f"trials, baseline included [{d.num_samples}]")
    p.add_argument(
        "--max-concurrent-trials",
        type=int,
        help=f"trials running at once [{d.max_concurrent_trials}]",
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        help=f"wall-clock budget of the search in seconds [{d.time_budget_s}]",
    )
    p.add_argument(
        "--train-steps", type=int, help=f"training steps of a full trial [{d.train_steps}]"
    )
    p.add_argument("--eval-every", type=int, help=f"steps between scores [{d.eval_every}]")
    p.add_argument("--seed", type=int, help=f"seed of the search and the scoring [{d.seed}]")
    p.add_argument("--storage", help=f"Tune experiment storage, folder or URL [{d.storage}]")
    p.add_argument("--out", help=f"best-setting JSON to write (DVC out) [{d.out}]")
    p.add_argument("--metrics", help=f"metrics JSON to write (DVC metrics) [{d.metrics}]")
    p.add_argument("--ray-address", help="Ray cluster [tune.ray.address, else RAY_ADDRESS]")
    p.add_argument("--local-cpus", type=int, help="CPUs of a locally started Ray [all]")
    p.add_argument(
        "--cpus-per-trial", type=float, help=f"Ray CPUs per trial [{d.ray.cpus_per_trial}]"
    )
    p.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        help=f"log the search to MLflow [{d.mlflow.enabled}]",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI [MLFLOW_TRACKING_URI, else local]")
    p.add_argument("--experiment", help=f"MLflow experiment [{d.mlflow.experiment}]")
    return p


def resolve(argv: list[str] | None = None) -> tuple[TuneParams, CFEBMConfig, argparse.Namespace]:
    """(tune settings, the trials' base cfebm config, args) from params.yaml and the CLI."""
    args = build_parser().parse_args(argv)
    path = args.params or "params.yaml"
    section = load_section(path, SECTION, required=bool(args.params))
    section = apply_overrides(section, args, OVERRIDES)
    params = params_from_dict(section)
    base = trial_base_config(params, load_section(path, "train", required=False))
    return params, base, args


# --- the search --------------------------------------------------------------------------


def dimension_sampler(name: str, dim: Dimension):
    """The Ray Tune domain of one dimension."""
    from ray import tune

    if dim.values is not None:
        values = [int(v) for v in dim.values] if name == "steps" else list(dim.values)
        return tune.grid_search(values) if dim.grid else tune.choice(values)
    if name == "steps":
        low, high = int(dim.low), int(dim.high)
        return tune.lograndint(low, high + 1) if dim.log else tune.randint(low, high + 1)
    return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)


def param_space(space: SearchSpace) -> dict:
    return {name: dimension_sampler(name, dim) for name, dim in space.dimensions().items()}


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default repeats the whole config)."""
    return f"trial-{trial.trial_id}"


@dataclass
class Inputs:
    """What the trials read besides the data: bytes shipped to every trial, and hashes."""

    warm_start: bytes | None = None
    features: bytes | None = None
    keys: dict[str, str] = field(default_factory=dict)


def read_inputs(p: TuneParams, base: CFEBMConfig) -> Inputs:
    """The warm-start model and the extractor weights (checked here, before Ray starts)."""
    out = Inputs()
    out.keys["dataset"] = ray_utils.dataset_key(p.data, p.data_storage_options)
    if p.stage > 0:
        if not cio.exists(p.warm_start):
            raise ConfigError(
                f"tune.warm_start {p.warm_start} does not exist: train stage {p.stage - 1} first"
            )
        prev = load_checkpoint(p.warm_start)
        if from_dict(prev["config"]).model != base.model or int(prev["stage"]) != p.stage - 1:
            raise ConfigError(
                f"tune.warm_start {p.warm_start} is not a stage-{p.stage - 1} model of "
                "train.model's network"
            )
        out.warm_start = cio.read_bytes(p.warm_start)
        out.keys["warm_start"] = hashlib.sha256(out.warm_start).hexdigest()
    if p.extractor == "domain":
        if not cio.exists(p.features):
            raise FeatureError(
                f"tune.features {p.features} does not exist: train the domain extractor first "
                "(dvc repro features, or python -m pipelines.features)"
            )
        out.features = cio.read_bytes(p.features)
        out.keys["features"] = hashlib.sha256(out.features).hexdigest()
    return out


@dataclass
class TrialSummary:
    """One trial as the outputs and the console show it."""

    trial_id: str | None
    setting: dict
    outcome: str
    step: int = 0
    score: float | None = None
    error: str | None = None
    score_key: str | None = None
    """The score's metric key, e.g. ``kid_mean_cfebm-digits-cnn``."""


def summarize(grid, p: TuneParams) -> list[TrialSummary]:
    """Every trial of a finished search, with its outcome.

    completed: trained all ``train_steps``; stopped_early: stopped by ASHA (or by the time
    budget) after at least one score; diverged; error; not_run (the budget ran out first).
    """
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        setting = {
            k: config[k] for k in sorted(config) if k in ("step_size", "noise_start", "steps")
        }
        trial_id = metrics.get("trial_id") or os.path.basename(str(result.path)).removeprefix(
            "trial-"
        )
        step = int(metrics.get("step") or 0)
        score = metrics.get("score")
        if result.error is not None:
            outcome = "error"
        elif metrics.get("diverged"):
            outcome = "diverged"
        elif score is None:
            outcome = "not_run"
        elif step >= p.train_steps:
            outcome = "completed"
        else:
            outcome = "stopped_early"
        if outcome in ("diverged", "not_run", "error") or not _finite(score):
            score = None
        error = str(result.error).splitlines()[0][:500] if result.error is not None else None
        prefix = "kid_mean_" if p.metric == "kid" else "fid_"
        key = next((k for k in metrics if k.startswith(prefix)), None)
        trials.append(TrialSummary(trial_id, setting, outcome, step, score, error, key))
    return sorted(trials, key=lambda t: str(t.trial_id))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x < DIVERGED_SCORE


def pick_best(trials: list[TrialSummary]) -> TrialSummary:
    """The trial trained furthest, then with the lowest score.

    Scores are only comparable at equal training: a trial that ASHA stopped at step 20 is
    not better than a finished one because its early score happens to be lower.
    """
    scored = [t for t in trials if t.score is not None]
    if not scored:
        errors = [f"{t.trial_id}: {t.error}" for t in trials if t.error]
        raise TuneError(
            "no trial produced a score ("
            + ", ".join(f"{n} {o}" for o in OUTCOMES if (n := sum(t.outcome == o for t in trials)))
            + ")"
            + (f"; first error: {errors[0]}" if errors else "")
            + ". Narrow tune.space (smaller step sizes diverge less) or raise time_budget_s."
        )
    return min(scored, key=lambda t: (-t.step, t.score))


def run_tune(p: TuneParams, base: CFEBMConfig, echo=print) -> dict:
    """Run (or continue) the search; write the best setting and the metrics; return them."""
    # Ray folds similar lines from workers into one ("repeated 10x", read when ray is first
    # imported): the trials' score lines differ only in numbers, and each of them matters.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.tune_scheduler import ResumableASHA

    t_start = time.time()
    resolution = base.model.resolutions[p.stage]
    inputs = read_inputs(p, base)
    key = experiment_key(p, base, inputs.keys)
    name = f"tune-stage{p.stage}-{resolution}x{resolution}-{key}"

    echo(f"tune: {ray_utils.connect(p.ray.address, p.ray.local_cpus)}")
    nodes = len(ray_utils.alive_nodes())
    storage = ray_utils.absolute(p.storage)
    ray_utils.check_paths(nodes, {"tune.storage": storage}, p.shared_filesystem)
    data_url = ray_utils.dataset_for_workers(
        p.data, storage, nodes, p.shared_filesystem, p.data_storage_options, p.storage_options
    )
    storage_path, storage_fs = ray_utils.ray_storage(storage, p.storage_options)
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs)

    runs = parent = tune_run = None
    uri = experiment_id = None
    if p.mlflow.enabled:
        from pipelines import tracking

        uri = tracking.resolve_tracking_uri(p.mlflow.tracking_uri)
        runs = tracking.PipelineRuns(uri, p.mlflow.experiment)
        experiment_id = runs.experiment_id
        parent = runs.parent()
        mlflow_params = tracking.flatten(p.public())
        mlflow_params.update(
            {
                "experiment": name,
                "resolution": str(resolution),
                **{f"base.sampler.{k}": str(v) for k, v in to_dict(base.sampler).items()},
            }
        )
        tune_run, continued = runs.stage(
            parent,
            key=name,
            run_name=f"tune-stage{p.stage}",
            params=mlflow_params,
            tags={"cfebm.stage": "tune", "cfebm.tune.experiment": name},
        )
        echo(f"tune: MLflow {uri} run {tune_run}" + (" (continued)" if continued else ""))

    try:
        job = TrialJob(
            experiment=name,
            stage=p.stage,
            config=to_dict(base),
            data_url=data_url,
            data_options=p.data_storage_options,
            split=p.split,
            warm_start=inputs.warm_start,
            extractor=p.extractor,
            features=inputs.features,
            inception_weights=p.inception_weights,
            metric=p.metric,
            train_steps=p.train_steps,
            eval_every=p.eval_every,
            eval_samples=p.eval_samples,
            num_reference=p.num_reference,
            kid_subsets=p.kid_subsets,
            kid_subset_size=p.kid_subset_size,
            seed=p.seed,
            threads=p.ray.threads,
            tracking_uri=uri,
            experiment_id=experiment_id,
            tune_run_id=tune_run,
            log_every=p.mlflow.log_every,
            report_delay_s=p.debug.report_delay_s,
        )
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
                storage_filesystem=storage_fs,
            )
        else:
            baseline = baseline_point(p.space, base.sampler) if p.include_baseline else None
            if p.include_baseline and baseline is None:
                echo("tune: train.sampler lies outside tune.space: no baseline trial")
            scheduler = FIFOScheduler()
            if p.asha.enabled:
                scheduler = ResumableASHA(
                    time_attr="step",
                    max_t=p.train_steps,
                    grace_period=min(p.asha.grace_steps, p.train_steps),
                    reduction_factor=p.asha.reduction_factor,
                )
            echo(
                f"tune: new experiment {exp_path}: {p.num_samples} trial(s) of stage {p.stage} "
                f"({resolution}x{resolution}), {p.max_concurrent_trials} at a time; "
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
                        points_to_evaluate=[baseline] if baseline else None,
                        max_concurrent=p.max_concurrent_trials,
                        random_state=p.seed,
                    ),
                    num_samples=p.num_samples,
                    time_budget_s=p.time_budget_s,
                    reuse_actors=p.ray.reuse_actors,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    storage_filesystem=storage_fs,
                    # Every checkpoint is kept (num_to_keep=None): after a kill, the last
                    # saved experiment state may name an older one, which must still exist.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=p.ray.keep_checkpoints),
                    failure_config=tune.FailureConfig(max_failures=p.ray.max_failures),
                    verbose=p.ray.verbose,
                ),
            )
        if p.ray.state_every_s is not None:  # read by Tune's controller when fit() starts
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(p.ray.state_every_s)
        # On Ctrl-C Tune would end the search "gracefully" and return its partial results
        # as if it had finished; a KeyboardInterrupt instead leaves no outputs, and the
        # next run restores the experiment from its last saved state.
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        t_fit = time.time()
        grid = tuner.fit()
        fit_seconds = time.time() - t_fit
        if grid.num_terminated + grid.num_errors < len(grid):
            raise KeyboardInterrupt(
                f"tune: interrupted; run the stage again to continue the experiment {exp_path}"
            )
        trials = summarize(grid, p)
        best = pick_best(trials)
        summary = write_outputs(p, base, trials, best, name, exp_path, restoring)
        summary["metrics"].update(
            {"fit_seconds": round(fit_seconds, 2), "wall_seconds": round(time.time() - t_start, 2)}
        )
        write_json(p.metrics, summary["metrics"])
        if runs is not None:
            log_results(runs, uri, tune_run, name, experiment_id, trials, best, grid, summary)
    except BaseException as e:
        if runs is not None and not isinstance(e, KeyboardInterrupt):
            runs.end_stage(tune_run, "FAILED")
            runs.end_pipeline(parent, "FAILED")
        raise
    if runs is not None:
        runs.end_stage(tune_run, "FINISHED")  # the pipeline run stays open for training
    print_table(trials, best, echo)
    return summary


# --- outputs -------------------------------------------------------------------------------


def write_outputs(
    p: TuneParams,
    base: CFEBMConfig,
    trials: list[TrialSummary],
    best: TrialSummary,
    name: str,
    exp_path: str,
    restored: bool,
) -> dict:
    """``tune.out`` (the best setting and every trial) and the metrics (returned; the
    caller adds timings and writes them)."""
    resolution = base.model.resolutions[p.stage]
    baseline = {k: getattr(base.sampler, k) for k in p.space.dimensions()}
    best_json = {
        "sampler": best.setting,
        "score": best.score,
        "metric": p.metric,
        "metric_key": best.score_key,
        "step": best.step,
        "trial_id": best.trial_id,
        "stage": p.stage,
        "resolution": resolution,
        "baseline": baseline,
        "experiment": exp_path,
        "trials": [asdict(t) for t in trials],
    }
    cio.write_bytes(p.out, (json.dumps(best_json, indent=2) + "\n").encode())
    counts = {o: sum(t.outcome == o for t in trials) for o in OUTCOMES}
    metrics = {
        "best_score": best.score,
        **{f"best_{k}": v for k, v in best.setting.items()},
        "trials": len(trials),
        **counts,
        "restored": restored,
        "experiment": name,
    }
    return {"best": best_json, "metrics": metrics}


def write_json(path: str, data: dict) -> None:
    cio.write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def log_results(runs, uri, tune_run, name, experiment_id, trials, best, grid, summary) -> None:
    """Close every trial's MLflow run with its outcome; log the result to the tune run."""
    from pipelines.tracking import RunLogger

    client = runs.client
    for t in trials:
        if t.trial_id is None:
            continue
        run_id = find_trial_run(client, experiment_id, trial_tag(name, t.trial_id))
        if run_id is None:
            continue
        client.set_tag(run_id, OUTCOME_TAG, t.outcome)
        client.set_terminated(run_id, "FAILED" if t.outcome == "error" else "FINISHED")
    logger = RunLogger(uri, tune_run)
    numbers = {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float))}
    logger.metrics(0, {k: float(v) for k, v in numbers.items() if v is not None})
    logger.flush()
    client.set_tag(tune_run, "cfebm.tune.best_trial", str(best.trial_id))
    logger.text(json.dumps(summary["best"], indent=2), "tune/best.json")
    for result in grid:
        if (result.metrics or {}).get("trial_id") != best.trial_id or result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as d:
            png = os.path.join(d, SAMPLES_FILE)
            if os.path.exists(png):
                with open(png, "rb") as f:
                    logger.png(f.read(), "tune/best_samples.png")


def print_table(trials: list[TrialSummary], best: TrialSummary, echo=print) -> None:
    keys = sorted({k for t in trials for k in t.setting})
    echo(
        "tune: "
        + "  ".join(["trial".ljust(12), *(k.ljust(11) for k in keys), "outcome       step  score"])
    )
    for t in sorted(trials, key=lambda t: (t.score is None, t.score or 0.0)):
        mark = "*" if t is best else " "
        cells = [f"{t.setting.get(k, float('nan')):<11.4g}" for k in keys]
        score = f"{t.score:.4g}" if t.score is not None else "-"
        echo(
            f"tune:{mark}"
            + "  ".join([str(t.trial_id).ljust(12), *cells, t.outcome.ljust(13)])
            + f" {t.step:>5}  {score}"
        )


def main(argv: list[str] | None = None) -> None:
    try:
        params, base, args = resolve(argv)
        if args.dry_run:
            print(json.dumps({**params.public(), "base_config": to_dict(base)}, indent=2))
            return
        summary = run_tune(params, base)
    except (
        ConfigError,
        DataError,
        FeatureError,
        InceptionWeightsError,
        TuneError,
        ray_utils.ClusterStorageError,
    ) as e:
        sys.exit(f"tune: error: {e}")
    except KeyboardInterrupt as e:
        sys.exit(str(e) or "tune: interrupted; run the stage again to continue")
    best = summary["best"]
    setting = ", ".join(f"{k} {v:.4g}" for k, v in best["sampler"].items())
    print(
        f"tune: best {setting}: {best['metric_key']} {best['score']:.4g} at step {best['step']} "
        f"(trial {best['trial_id']}); wrote {params.out} and {params.metrics}"
    )


if __name__ == "__main__":
    main()
