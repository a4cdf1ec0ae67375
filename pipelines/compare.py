"""Compare the last pipeline runs recorded in MLflow: what changed and what it gave.

    python -m pipelines.compare [--last 5] [--tracking_uri URI] [--format csv] [...]

Prints one column per pipeline run (newest first) and one row per field: the parameters
that differ between the runs shown (named as in params.yaml, ``train.sampler.step_size``),
FID and KID per stage from the evaluate runs, the best score of the tune run, and the
training time (the sum of the training stages' ``stage_seconds``). A pipeline run is a
parent run (tag ``cfebm.kind = pipeline``, pipelines/tracking.py) and its nested stage runs.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from cfebm.config import ConfigError
from pipelines import _cli, tracking

STAGE_METRIC = re.compile(r"^metrics\.stage_(\d+)/(fid|kid_mean)_(.+)$")
PARENT = "tags.mlflow.parentRunId"


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


def load_pipelines(opts: CompareOptions):
    """The newest ``opts.last`` pipeline runs, newest first, as a DataFrame indexed by run
    id: name, start, status, stages, parameters (``params.<name>``), scores, tune best and
    train seconds, gathered from the stage runs oldest first (a stage that ran twice in a
    pipeline run counts with its last run)."""
    uri = tracking.resolve_tracking_uri(opts.tracking_uri)
    with tracking.fluent_uri(uri):
        return _load_pipelines(opts, uri)


def _load_pipelines(opts: CompareOptions, uri: str):
    import mlflow

    if mlflow.get_experiment_by_name(opts.experiment) is None:
        raise ConfigError(
            f"no MLflow experiment {opts.experiment!r} in {uri}: run the pipeline first"
        )

    def search(kind: str, **kw):
        query = f"tags.`{tracking.KIND_TAG}` = '{kind}'"
        return mlflow.search_runs(experiment_names=[opts.experiment], filter_string=query, **kw)

    parents = search("pipeline", order_by=["attributes.start_time DESC"], max_results=opts.last)
    if parents.empty:
        return parents
    runs = search("stage", order_by=["attributes.start_time ASC"])
    needed = [PARENT, "tags.cfebm.stage", "metrics.stage_seconds", "metrics.best_score"]
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *needed])))
    runs = runs[runs[PARENT].isin(parents["run_id"])]
    stage = runs["tags.cfebm.stage"].fillna("")
    train = stage.str.isdigit()
    runs = runs.assign(
        name=("train@" + stage).where(train, stage.replace("", "other")),
        seconds=runs["metrics.stage_seconds"].where(train),
        best=runs["metrics.best_score"].where(stage == "tune"),
    )
    scores = {
        c: f"{'kid' if m[2] == 'kid_mean' else m[2]} s{m[1]} [{m[3]}]"
        for c in runs
        if (m := STAGE_METRIC.match(c))
    }
    params = [c for c in runs if c.startswith("params.") and c[7:] not in tracking.PER_STAGE_PARAMS]
    by = runs.groupby(PARENT)
    out = by[params + list(scores)].last().rename(columns=scores)
    out["stages"] = by["name"].agg(lambda names: ", ".join(dict.fromkeys(names)))
    out["tune best"] = by["best"].last()
    out["train seconds"] = runs.groupby([PARENT, "name"])["seconds"].last().groupby(level=0).sum()
    parents = parents.set_index("run_id")
    out = out.reindex(parents.index)
    out.insert(0, "run", parents["tags.mlflow.runName"])
    out.insert(1, "run id", parents.index.str[:8])
    local = parents["start_time"].map(lambda t: t.to_pydatetime().astimezone())  # local time
    out.insert(2, "started", local.map(lambda t: t.strftime("%Y-%m-%d %H:%M")))
    out.insert(3, "status", parents["status"])
    return out


def _short(value) -> str:
    try:
        return "-" if value is None or value != value else f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def table(rows, opts: CompareOptions):
    """The comparison as text: one row per pipeline run, one column per field shown."""
    params = [
        c
        for c in sorted(c for c in rows if c.startswith("params."))
        if opts.all_params
        or rows[c].nunique(dropna=False) > 1
        or any(fnmatch.fnmatchcase(c[7:], pat) for pat in opts.show)
    ]
    scores = sorted((c for c in rows if c[:4] in ("fid ", "kid ")), key=lambda k: (k.split()[1], k))
    shown = rows[["run", "run id", "started", "status", "stages"]].fillna("-").replace("", "-")
    shown = shown.join(rows[params + scores + ["tune best"]].map(_short))
    seconds = rows["train seconds"]
    shown["train seconds"] = seconds.map(lambda s: f"{s:.0f}" if s == s and s else "-")
    return shown.rename(columns=lambda c: c.removeprefix("params."))


def render(shown, fmt: str) -> str:
    if fmt == "csv":
        return shown.to_csv(index=False)
    cells = shown.T.astype(str).reset_index()
    cells = cells.apply(lambda column: column.str.ljust(column.str.len().max()))
    return "\n".join("  ".join(row).rstrip() for row in cells.values)


def compare(opts: CompareOptions) -> str:
    rows = load_pipelines(opts)
    if rows.empty:
        return f"no pipeline runs in MLflow experiment {opts.experiment!r} yet"
    return render(table(rows, opts), opts.format)


def main(argv: list[str] | None = None) -> None:
    try:
        opts, _ = _cli.parse(CompareOptions, "compare", argv, doc=__doc__)
        print(compare(opts))
    except ConfigError as e:
        _cli.fail("compare", e)


if __name__ == "__main__":
    _cli.script(main)
