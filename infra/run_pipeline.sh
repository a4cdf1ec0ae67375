#!/usr/bin/env bash
# The pipeline as a cluster job: `dvc repro` in a throwaway copy of the project (a Ray job's
# working directory, or the checkout in the cfebm image), with every byte that must outlive
# the job on shared storage:
#
#   * DVC outputs (datasets, models, metrics) -> the DVC remote, with the run cache, so that
#     a stage that an earlier job already ran is restored instead of run again;
#   * Ray Train checkpoints, Tune experiments -> train.ray.storage, tune.ray.storage (s3://...);
#   * runs, curves, sample grids             -> the MLflow server at MLFLOW_TRACKING_URI.
#
#   infra/run_pipeline.sh [--smoke] [--overlay FILE]... [--set KEY=VALUE]... [--storage URL]
#                         [--remote URL] [--no-push] [TARGET...]
#
#   --overlay FILE  deep-merge this YAML file over params.yaml (repeatable)
#   --smoke         --overlay tests/params_smoke.yaml (the team's smoke settings: tiny data,
#                   two short stages) with one training worker per node (train.ray.workers=2)
#   --set K=V       set params key K (dotted) to the YAML value V, after the overlays, e.g.
#                   --set 'train.model.resolutions=[4, 8]'
#   --storage URL   shared storage of the run: checkpoints go to URL/checkpoints
#                   (train.ray.storage), Tune experiments to URL/tune (tune.ray.storage) [$CFEBM_STORAGE; none: params.yaml's setting]
#   --remote URL    DVC remote, e.g. s3://bucket/dvc [$CFEBM_DVC_REMOTE; none: no push]
#   --no-push       do not push outputs and run cache to the remote at the end
#   TARGET...       stages for `dvc repro` (default: the whole pipeline)
#
# Overlays and settings edit params.yaml, so they are allowed only in a copy without .git
# (Ray job working directories and images never have one); in a developer checkout use
# `dvc exp run --set-param K=V` instead. S3 endpoint and credentials come from the usual
# AWS_* variables (DVC, s3fs, boto3 and pyarrow all read AWS_ENDPOINT_URL).
set -euo pipefail

SMOKE_OVERLAY=tests/params_smoke.yaml
SMOKE_SETS=("train.ray.workers=2")

remote=${CFEBM_DVC_REMOTE:-}
storage=${CFEBM_STORAGE:-}
push=1
overlays=()
sets=()
targets=()
while (($#)); do
	case $1 in
	--smoke)
		overlays+=("$SMOKE_OVERLAY")
		sets+=("${SMOKE_SETS[@]}")
		;;
	--overlay | --set | --storage | --remote)
		(($# >= 2)) || {
			echo "run_pipeline: $1 needs a value" >&2
			exit 2
		}
		case $1 in
		--overlay) overlays+=("$2") ;;
		--set) sets+=("$2") ;;
		--storage) storage=$2 ;;
		--remote) remote=$2 ;;
		esac
		shift
		;;
	--no-push) push=0 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	-*)
		echo "run_pipeline: unknown option $1 (see --help)" >&2
		exit 2
		;;
	*) targets+=("$1") ;;
	esac
	shift
done
# Before the --set options, so that an explicit --set train.ray.storage=... wins.
if [[ -n $storage ]]; then
	sets=("train.ray.storage=${storage%/}/checkpoints" "tune.ray.storage=${storage%/}/tune" "${sets[@]}")
fi

say() { printf 'run_pipeline: %s\n' "$*"; }

[[ -f dvc.yaml && -f params.yaml ]] || {
	echo "run_pipeline: run me in the project folder (no dvc.yaml/params.yaml in $PWD)" >&2
	exit 2
}

for overlay in "${overlays[@]}"; do
	[[ -f $overlay ]] || {
		echo "run_pipeline: no params overlay $overlay in $PWD" >&2
		exit 2
	}
done
if ((${#overlays[@]} + ${#sets[@]})); then
	[[ -e .git ]] && {
		echo "run_pipeline: refusing to edit params.yaml in a git checkout; use 'dvc exp run --set-param'" >&2
		exit 2
	}
	args=()
	for overlay in "${overlays[@]}"; do args+=(--overlay "$overlay"); done
	for item in "${sets[@]}"; do args+=(--set "$item"); done
	# The same merge as `make run PRESET=...` (pipelines/run.py).
	python -m pipelines.run --params-only "${args[@]}"
fi

# A copy without .git: DVC runs without an SCM (it still writes dvc.lock).
if [[ ! -e .git ]]; then
	dvc config --local core.no_scm true
fi

repro=(dvc repro)
if [[ -n $remote ]]; then
	dvc remote add --local --force --default cluster "$remote"
	# --pull: a stage whose command, dependencies and params match a pushed run is restored
	# from the remote's run cache instead of being run again.
	repro+=(--pull)
fi

say "${repro[*]} ${targets[*]}"
"${repro[@]}" "${targets[@]}"

if [[ -n $remote ]] && ((push)); then
	say "pushing outputs and run cache to $remote"
	dvc push --run-cache
fi
say "done"
