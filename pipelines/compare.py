"""Compare the last pipeline runs recorded in MLflow: what changed and what it gave.

    python -m pipelines.compare [--last N] [--tracking-uri URI] [--experiment NAME] [...]

Prints one column per pipeline run (newest first) and one row per field: the parameters
that differ between the runs shown (training, tune, evaluate and the uses of the energy,
each prefixed by its stage), FID and KID per stage from the ``evaluate`` run(s), the best
score of the ``tune`` run, and the training time (the sum of the training stages'
``stage_seconds``). ``--format csv`` writes one row per run instead.

A pipeline run is a parent run (tag ``cfebm.kind = pipeline``, pipelines/tracking.py) and
its nested stage runs. The last training stage ends its parent, so stages that run after
it (evaluate, restore, ood, translate) currently get a parent run of their own; such a
parent, holding no training or tune stage, is counted as part of the closest earlier
pipeline run that trained.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

PIPELINE_FILTER = "tags.`cfebm.kind` = 'pipeline'"
STAGE_METRIC = re.compile(r"^stage_(\d+)/(fid|kid_mean)_(.+)$")
TRAIN_ONLY_KEYS = {"stage", "resolution", "ray_run_name", "per_worker_batch", "stages"}
"""Parameters of a training stage run that differ from stage to stage by construction."""
NOISY_KEYS = {"tune.experiment"}
PIPELINE_ORDER = ("tune", "evaluate", "restore", "ood", "translate")
"""Stages other than training in the order the pipeline runs them (training after tune)."""
"""Parameters that hold a content hash: they differ whenever anything does."""


@dataclass
class CompareOptions:
    """What to compare and how to print it."""

    tracking_uri: str | None = None
    """null: ``MLFLOW_TRACKING_URI``, else the project's ``sqlite:///mlflow.db``."""
    experiment: str = "cfebm"
    last: int = 5
    """Pipeline runs to show, newest first."""
    params: list[str] = field(default_factory=list)
    """Parameter names or glob patterns to show even when equal in every run."""
    all_params: bool = False
    """Show every parameter, not only those that differ."""
    format: str = "text"
    """text (one column per run) or csv (one row per run)."""


@dataclass
class PipelineSummary:
    """One pipeline run as the table shows it."""

    run_id: str
    name: str
    start_ms: int
    status: str
    params: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    """``fid s0`` / ``kid s0`` (with the extractor when there are several)."""
    train_seconds: float | None = None
    train_stages: int = 0
    tune_best: float | None = None
    stages: list[str] = field(default_factory=list)


# --- reading MLflow ------------------------------------------------------------------------


def _children(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )


def _kind(run) -> str:
    """train / tune / evaluate / <use> / other, from a stage run's tags."""
    stage = run.data.tags.get("cfebm.stage", "")
    if stage.isdigit():
        return "train"
    return stage or "other"


def _seconds(run) -> float | None:
    if "stage_seconds" in run.data.metrics:
        return float(run.data.metrics["stage_seconds"])
    if run.info.end_time and run.info.start_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return None


def summarize_group(parent, children: list) -> PipelineSummary:
    """A pipeline run's parameters and results from its stage runs."""
    s = PipelineSummary(
        run_id=parent.info.run_id,
        name=parent.info.run_name or parent.info.run_id[:8],
        start_ms=parent.info.start_time or 0,
        status=parent.info.status,
    )
    latest = {}  # a stage run again in the same pipeline run (dvc repro after a change)
    for r in children:  # oldest first: the last run of each stage wins
        if _kind(r) == "train":
            latest[int(r.data.tags["cfebm.stage"])] = r
    train = [latest[stage] for stage in sorted(latest)]
    if train:
        s.params.update(
            {f"train.{k}": v for k, v in train[0].data.params.items() if k not in TRAIN_ONLY_KEYS}
        )
        seconds = [_seconds(r) for r in train]
        s.train_seconds = sum(x for x in seconds if x is not None) if any(seconds) else None
        s.train_stages = len(train)
    for run in children:  # later runs of a stage (a re-run evaluate) override earlier ones
        kind = _kind(run)
        if kind == "train":
            continue
        s.stages.append(kind)
        s.params.update({f"{kind}.{k}": v for k, v in run.data.params.items()})
        if kind == "tune" and "best_score" in run.data.metrics:
            s.tune_best = float(run.data.metrics["best_score"])
        if kind == "evaluate":  # one run per stage (evaluate@s) or one for all stages
            s.scores.update(stage_scores(run.data.metrics))
    order = {kind: i for i, kind in enumerate(PIPELINE_ORDER)}
    s.stages = sorted(set(s.stages), key=lambda k: (order.get(k, len(order)), k))
    if train:
        s.stages.insert(1 if "tune" in s.stages else 0, f"train x{len(train)}")
    return s


def stage_scores(metrics: dict[str, float]) -> dict[str, float]:
    """``{"stage_0/fid_cfebm-digits-cnn": v}`` -> ``{"fid s0": v}``, naming the extractor
    only when the run measured with several."""
    found = []  # (metric, stage, extractor, value)
    for key, value in metrics.items():
        if m := STAGE_METRIC.match(key):
            found.append((m.group(2), int(m.group(1)), m.group(3), value))
    several = len({extractor for *_, extractor, _ in found}) > 1
    out = {}
    for metric, stage, extractor, value in sorted(found, key=lambda x: (x[1], x[0], x[2])):
        name = "kid" if metric == "kid_mean" else metric
        label = f"{name} s{stage}" + (f" [{extractor}]" if several else "")
        out[label] = float(value)
    return out


def extractors_of(metrics: Iterable[str]) -> list[str]:
    return sorted({m.group(3) for k in metrics if (m := STAGE_METRIC.match(k))})


def load_pipelines(opts: CompareOptions) -> tuple[list[PipelineSummary], list[str]]:
    """The newest ``opts.last`` pipeline runs (newest first) and the extractors named."""
    from pipelines import tracking

    uri = tracking.resolve_tracking_uri(opts.tracking_uri)
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(opts.experiment)
    if exp is None:
        raise LookupError(
            f"no MLflow experiment {opts.experiment!r} in {uri}: run the pipeline first"
        )
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=PIPELINE_FILTER,
        order_by=["attributes.start_time DESC"],
        max_results=max(50, 10 * opts.last),
    )
    groups: list[tuple[object, list]] = []
    extractors: set[str] = set()
    for parent in reversed(parents):  # oldest first, so follow-up parents find their run
        children = _children(client, exp.experiment_id, parent.info.run_id)
        kinds = {_kind(r) for r in children}
        for r in children:
            if _kind(r) == "evaluate":
                extractors.update(extractors_of(r.data.metrics))
        if groups and kinds and not kinds & {"train", "tune"}:
            groups[-1][1].extend(children)
        else:
            groups.append((parent, list(children)))
    rows = [summarize_group(p, c) for p, c in groups]
    rows.sort(key=lambda r: r.start_ms, reverse=True)
    return rows[: opts.last], sorted(extractors)


# --- the table ------------------------------------------------------------------------------


def _short(value: str) -> str:
    """Numbers to 4 significant digits; anything else as it is."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if str(value).strip().lower() in ("nan", "inf", "-inf"):
        return str(value)
    return f"{x:.4g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def chosen_params(rows: list[PipelineSummary], opts: CompareOptions) -> list[str]:
    """Parameter names to show: those that differ across ``rows`` (a missing value counts
    as different), plus those matching ``opts.params``; all with ``opts.all_params``."""
    keys = sorted({k for r in rows for k in r.params})
    out = []
    for k in keys:
        forced = any(fnmatch.fnmatchcase(k, pat) for pat in opts.params)
        values = {r.params.get(k) for r in rows}
        differs = len(values) > 1 and k not in NOISY_KEYS
        if opts.all_params or forced or differs:
            out.append(k)
    return out


def table(rows: list[PipelineSummary], opts: CompareOptions) -> list[tuple[str, list[str]]]:
    """(field, value per run) rows of the comparison."""
    fields: list[tuple[str, list[str]]] = [
        ("run", [r.name for r in rows]),
        ("run id", [r.run_id[:8] for r in rows]),
        (
            "started",
            [time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_ms / 1000)) for r in rows],
        ),
        ("status", [r.status for r in rows]),
        ("stages", [", ".join(r.stages) or "-" for r in rows]),
    ]
    for k in chosen_params(rows, opts):
        fields.append((k, [_short(r.params[k]) if k in r.params else "-" for r in rows]))
    score_keys = sorted(
        {k for r in rows for k in r.scores}, key=lambda k: (int(k.split()[1][1:]), k)
    )
    for k in score_keys:
        fields.append((k, [_short(r.scores[k]) if k in r.scores else "-" for r in rows]))
    fields.append(
        ("tune best", [_short(r.tune_best) if r.tune_best is not None else "-" for r in rows])
    )
    fields.append(("train time", [_duration(r.train_seconds) for r in rows]))
    return fields


def render_text(fields: list[tuple[str, list[str]]]) -> str:
    width = max(len(name) for name, _ in fields)
    cols = len(fields[0][1])
    widths = [max(len(values[i]) for _, values in fields) for i in range(cols)]
    lines = []
    for n, (name, values) in enumerate(fields):
        cells = "  ".join(v.ljust(widths[i]) for i, v in enumerate(values))
        lines.append(f"{name.ljust(width)}  {cells}".rstrip())
        if n == 4:  # after the run's identity
            lines.append("-" * (width + 2 + sum(widths) + 2 * (cols - 1)))
    return "\n".join(lines)


def render_csv(fields: list[tuple[str, list[str]]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([name for name, _ in fields])
    for i in range(len(fields[0][1])):
        writer.writerow([values[i] for _, values in fields])
    return buf.getvalue()


def compare(opts: CompareOptions) -> str:
    """The comparison as text (or CSV)."""
    rows, extractors = load_pipelines(opts)
    if not rows:
        return f"no pipeline runs in MLflow experiment {opts.experiment!r} yet"
    fields = table(rows, opts)
    if opts.format == "csv":
        return render_csv(fields)
    text = render_text(fields)
    notes = []
    if len(rows) == 1:
        notes.append("one pipeline run: no parameter differs (use --all-params to list them)")
    if extractors:
        notes.append("fid/kid: in the feature space of " + ", ".join(extractors))
    return "\n".join([text, *notes])


def build_parser() -> argparse.ArgumentParser:
    d = CompareOptions()
    p = argparse.ArgumentParser(
        prog="python -m pipelines.compare",
        description=__doc__.split("\n\n")[0],
        epilog="The MLflow UI shows the same: `make ui`, select the runs, Compare.",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI [MLFLOW_TRACKING_URI, else sqlite:///mlflow.db]"
    )
    p.add_argument("--experiment", default=d.experiment, help=f"MLflow experiment [{d.experiment}]")
    p.add_argument(
        "-n",
        "--last",
        type=int,
        default=d.last,
        help=f"pipeline runs to show, newest first [{d.last}]",
    )
    p.add_argument(
        "--params",
        nargs="+",
        default=[],
        metavar="KEY",
        help="parameters (names or globs, e.g. 'train.cfebm.sampler.*') to show even when equal",
    )
    p.add_argument(
        "--all-params", action="store_true", help="show every parameter, not only those that differ"
    )
    p.add_argument(
        "--format",
        choices=("text", "csv"),
        default=d.format,
        help="text: one column per run; csv: one row per run [text]",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.last < 1:
        sys.exit("compare: error: --last must be >= 1")
    opts = CompareOptions(
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        last=args.last,
        params=args.params,
        all_params=args.all_params,
        format=args.format,
    )
    try:
        print(compare(opts))
    except LookupError as e:
        sys.exit(f"compare: error: {e}")


if __name__ == "__main__":
    main()
