#!/usr/bin/env bash
# Run a pipeline command on a Ray cluster through the Ray Jobs API, with this checkout as
# the job's working directory (uploaded; .gitignore'd files stay here).
#
#   infra/local/submit.sh                    # the smoke pipeline (see DEFAULT below)
#   infra/local/submit.sh -- COMMAND [ARG]...  # any command, run in the uploaded project
#   infra/local/submit.sh --no-wait -- ...   # print the job id and return
#
# The cluster: with RAY_ADDRESS set (the dashboard URL, http://head:8265), the one it
# names, with MLFLOW_TRACKING_URI, AWS_*, CFEBM_* and RAY_AUTH_* from this environment;
# otherwise the local cluster of $CFEBM_CLUSTER_DIR/env (`infra/local/cluster.sh up`
# writes it). The AWS_*, MLFLOW_TRACKING_* and CFEBM_* variables are passed on to the job,
# so storage, tracking and credentials are the same for the driver and every Ray worker.
# On a shared cluster prefer instance roles or Kubernetes secrets to passing AWS keys this
# way (a job's runtime environment is visible on the dashboard).
#
# Exit status: 0 when the job succeeded, 1 otherwise (with --no-wait: when submitted).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${CFEBM_CLUSTER_DIR:-$ROOT/.cluster}
BIN=${CFEBM_BIN:-$ROOT/.venv/bin}

# The smoke pipeline: the whole DVC pipeline on tiny data, outputs and run cache pushed to
# the cluster's S3, checkpoints on that S3, tracking on the cluster's MLflow server.
DEFAULT=(bash infra/run_pipeline.sh --smoke)

wait_flag=()
while (($#)); do
	case $1 in
	--no-wait) wait_flag=(--no-wait) ;;
	--)
		shift
		break
		;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "submit: unknown option $1 (commands go after --)" >&2
		exit 2
		;;
	esac
	shift
done
(($#)) || set -- "${DEFAULT[@]}"

if [[ -z ${RAY_ADDRESS:-} ]]; then
	[[ -f $STATE/env ]] || {
		echo "submit: no cluster: run 'make cluster-up' (or set RAY_ADDRESS to a dashboard URL)" >&2
		exit 2
	}
	# shellcheck source=/dev/null
	. "$STATE/env"
fi
# Where the job keeps data: the DVC remote and checkpoints, under the cluster's storage.
if [[ -n ${CFEBM_STORAGE:-} ]]; then
	export CFEBM_DVC_REMOTE=${CFEBM_DVC_REMOTE:-$CFEBM_STORAGE/dvc}
fi

# The job's runtime environment: the variables above (never RAY_ADDRESS: inside the job
# Ray sets it to the cluster's GCS) and the files that stay behind.
runtime_env=$(PYTHONPATH=$ROOT "$BIN/python" - <<-'EOF'
	import json, os
	from cfebm.redact import public_env
	# Ray records a job's runtime environment: credentials stay out of it (the nodes have
	# them in their own environment, as instance roles or mounted secrets give them).
	env = public_env(dict(os.environ), ("AWS_", "MLFLOW_TRACKING_", "CFEBM_"))
	# Local state and caches never travel (most are .gitignore'd, which Ray honours too).
	# Patterns are gitignore-style: anchored with "/", or `data` would also drop cfebm/data.
	excludes = ["/.git", "/.venv", "/.cluster", "/.dvc/cache", "/.dvc/tmp", "/.dvc/config.local",
	            "/data", "/runs", "/models", "/mlruns", "/mlflow.db", "/outputs", "__pycache__"]
	print(json.dumps({"env_vars": env, "excludes": excludes}))
EOF
)

echo "submit: $* -> $RAY_ADDRESS"
cd "$ROOT"
exec "$BIN/ray" job submit --address "$RAY_ADDRESS" --working-dir . \
	--runtime-env-json "$runtime_env" --log-style record --log-color false \
	"${wait_flag[@]}" -- "$@"
