"""Compare the last pipeline runs recorded in MLflow: what changed and what it gave.

    python -m pipelines.compare [--last 5] [--tracking_uri URI] [--format csv] [...]

Prints one column per pipeline run (newest first) and one row per field: the parameters
that differ between the runs shown (named as in params.yaml, ``train.sampler.step_size``),
FID and KID per stage from the evaluate runs, the best score of the tune run, and the
training time (the sum of the training stages' ``stage_seconds``). A pipeline run is a
parent run (tag ``cfebm.kind = pipeline``, pipelines/tracking.py) and its nested stage runs.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import re
import time
from dataclasses import dataclass, field

from cfebm.config import ConfigError
from pipelines import _cli, tracking

STAGE_METRIC = re.compile(r"^stage_(\d+)/(fid|kid_mean)_(.+)$")


@dataclass
class CompareOptions:
    """Compare the last pipeline runs in MLflow."""

    tracking_uri: str | None = None
    """null: ``MLFLOW_TRACKING_URI``, else the project's ``sqlite:///mlflow.db``."""
    experiment: str = "cfebm"
    last: int = 5
    """Pipeline runs to show, newest first."""
    show: list[str] = field(default_factory=list)
    """Parameter names or glob patterns (``train.sampler.*``) to show even when equal."""
    all_params: bool = False
    """Show every parameter, not only those that differ."""
    format: str = "text"
    """text (one column per run) or csv (one row per run)."""

    def __post_init__(self) -> None:
        if self.last < 1 or self.format not in ("text", "csv"):
            raise ConfigError("compare: --last must be >= 1 and --format text or csv")


@dataclass
class PipelineSummary:
    run_id: str
    name: str
    start_ms: int
    status: str
    params: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    train_seconds: float | None = None
    tune_best: float | None = None
    stages: list[str] = field(default_factory=list)


def _kind(run) -> str:
    stage = run.data.tags.get("cfebm.stage", "")
    return "train" if stage.isdigit() else stage or "other"


def summarize(parent, children: list) -> PipelineSummary:
    """A pipeline run's parameters and results from its stage runs, oldest first: a stage
    that ran twice in it counts with its last run."""
    s = PipelineSummary(
        parent.info.run_id,
        parent.info.run_name or parent.info.run_id[:8],
        parent.info.start_time or 0,
        parent.info.status,
    )
    seconds = {}
    for r in children:
        kind, stage = _kind(r), r.data.tags.get("cfebm.stage")
        name = f"train@{stage}" if kind == "train" else kind
        if name not in s.stages:
            s.stages.append(name)
        shared = {k: v for k, v in r.data.params.items() if k not in tracking.PER_STAGE_PARAMS}
        s.params.update(shared)
        if kind == "train" and "stage_seconds" in r.data.metrics:
            seconds[stage] = r.data.metrics["stage_seconds"]
        if kind == "tune" and "best_score" in r.data.metrics:
            s.tune_best = r.data.metrics["best_score"]
        for key, value in r.data.metrics.items():
            if m := STAGE_METRIC.match(key):
                metric = "kid" if m.group(2) == "kid_mean" else m.group(2)
                s.scores[f"{metric} s{m.group(1)} [{m.group(3)}]"] = value
    s.train_seconds = sum(seconds.values()) if seconds else None
    return s


def load_pipelines(opts: CompareOptions) -> list[PipelineSummary]:
    """The newest ``opts.last`` pipeline runs, newest first."""
    uri = tracking.resolve_tracking_uri(opts.tracking_uri)
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(opts.experiment)
    if exp is None:
        raise ConfigError(
            f"no MLflow experiment {opts.experiment!r} in {uri}: run the pipeline first"
        )
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{tracking.KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=opts.last,
    )
    return [
        summarize(
            p,
            client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{p.info.run_id}'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
            ),
        )
        for p in parents
    ]


def _short(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def table(rows: list[PipelineSummary], opts: CompareOptions) -> list[tuple[str, list[str]]]:
    """(field, value per run) rows of the comparison."""
    fields = [
        ("run", [r.name for r in rows]),
        ("run id", [r.run_id[:8] for r in rows]),
        (
            "started",
            [time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_ms / 1000)) for r in rows],
        ),
        ("status", [r.status for r in rows]),
        ("stages", [", ".join(r.stages) or "-" for r in rows]),
    ]
    for k in sorted({k for r in rows for k in r.params}):
        differs = len({r.params.get(k) for r in rows}) > 1
        if opts.all_params or differs or any(fnmatch.fnmatchcase(k, pat) for pat in opts.show):
            fields.append((k, [_short(r.params[k]) if k in r.params else "-" for r in rows]))
    for k in sorted({k for r in rows for k in r.scores}, key=lambda k: (k.split()[1], k)):
        fields.append((k, [_short(r.scores[k]) if k in r.scores else "-" for r in rows]))
    fields.append(
        ("tune best", [_short(r.tune_best) if r.tune_best is not None else "-" for r in rows])
    )
    fields.append(
        ("train seconds", [f"{r.train_seconds:.0f}" if r.train_seconds else "-" for r in rows])
    )
    return fields


def render(fields: list[tuple[str, list[str]]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([name for name, _ in fields])
        w.writerows(zip(*(values for _, values in fields)))
        return buf.getvalue()
    width = max(len(name) for name, _ in fields)
    cols = [max(len(v[i]) for _, v in fields) for i in range(len(fields[0][1]))]
    return "\n".join(
        f"{name.ljust(width)}  " + "  ".join(v.ljust(c) for v, c in zip(values, cols)).rstrip()
        for name, values in fields
    )


def compare(opts: CompareOptions) -> str:
    rows = load_pipelines(opts)
    if not rows:
        return f"no pipeline runs in MLflow experiment {opts.experiment!r} yet"
    return render(table(rows, opts), opts.format)


def main(argv: list[str] | None = None) -> None:
    try:
        opts, _ = _cli.parse(CompareOptions, "compare", argv, doc=__doc__)
        print(compare(opts))
    except ConfigError as e:
        _cli.fail("compare", e)


if __name__ == "__main__":
    main()
