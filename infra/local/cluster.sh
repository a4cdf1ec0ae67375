#!/usr/bin/env bash
# A real, small cluster on this machine, on 127.0.0.1 only:
#
#   * a Ray head node and a second Ray node (two raylets, as on two machines),
#   * a moto S3 server with one bucket (data, checkpoints, MLflow artifacts),
#   * an MLflow tracking server (sqlite backend, artifacts proxied to that S3).
#
#   infra/local/cluster.sh up       start everything, wait until it answers, write the env file
#   infra/local/cluster.sh status   what runs, where, and the logs
#   infra/local/cluster.sh down     stop exactly what `up` started
#
# State lives in $CFEBM_CLUSTER_DIR (default .cluster/, git-ignored): pids/, logs/, the Ray
# session folders, the MLflow database, the Ray auth token, and `env`, which clients
# source (`make submit` does):
#
#   . .cluster/env && ray job submit -- python -c 'import ray; ray.init(); print(ray.nodes())'
#
# Ray token authentication is ON (RAY_AUTH_MODE=token, a fresh token in the state folder):
# Ray 2.60 turns it on by itself for `ray.init()` clusters and for `ray start` whenever a
# token exists in ~/.ray, so a recipe that left it implicit would behave differently from
# one machine to the next. Clients get the token through RAY_AUTH_TOKEN_PATH in `env`.
#
# Every process is started in its own session (setsid) and recorded in pids/; `down` ends
# those sessions, then any process still running from inside the state folder (a Ray job's
# entrypoint runs in a session of its own there), and never uses `ray stop`, which would
# end every Ray process of every user on the machine.
#
# Settings (environment; defaults in brackets):
#   CFEBM_CLUSTER_DIR [<repo>/.cluster]     CFEBM_BIN [<repo>/.venv/bin] (ray, mlflow, moto_server)
#   CFEBM_RAY_PORT [6390] (GCS)             CFEBM_DASHBOARD_PORT [8275] (dashboard, Jobs API)
#   CFEBM_S3_PORT [9010]                    CFEBM_MLFLOW_PORT [5050]
#   CFEBM_BUCKET [cfebm]                    CFEBM_HEAD_CPUS [1]   CFEBM_WORKER_CPUS [1]
#   CFEBM_OBJECT_STORE_MB [256] (per node)  CFEBM_CLUSTER_TIMEOUT [240] (seconds to wait for `up`)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${CFEBM_CLUSTER_DIR:-$ROOT/.cluster}
BIN=${CFEBM_BIN:-$ROOT/.venv/bin}
HOST=127.0.0.1
RAY_PORT=${CFEBM_RAY_PORT:-6390}
DASHBOARD_PORT=${CFEBM_DASHBOARD_PORT:-8275}
S3_PORT=${CFEBM_S3_PORT:-9010}
MLFLOW_PORT=${CFEBM_MLFLOW_PORT:-5050}
BUCKET=${CFEBM_BUCKET:-cfebm}
HEAD_CPUS=${CFEBM_HEAD_CPUS:-1}
WORKER_CPUS=${CFEBM_WORKER_CPUS:-1}
OBJECT_STORE_MB=${CFEBM_OBJECT_STORE_MB:-256}
TIMEOUT=${CFEBM_CLUSTER_TIMEOUT:-240}
SERVICES=(s3 mlflow ray-head ray-worker) # start order; `down` goes in reverse

PY=$BIN/python
PIDS=$STATE/pids
LOGS=$STATE/logs

say() { printf 'cluster: %s\n' "$*"; }
die() {
	printf 'cluster: error: %s\n' "$*" >&2
	exit 1
}

# ----------------------------------------------------------------------------- processes

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

# A process that exists and is not a zombie (a zombie is dead, only not yet reaped).
alive() {
	[[ -n $1 ]] && kill -0 "$1" 2>/dev/null || return 1
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat:0:1} != Z ]]
}

# Processes of session $1 (each service runs in its own session, led by the recorded pid).
session_members() {
	local pid
	for pid in $(pgrep -s "$1" 2>/dev/null || true); do alive "$pid" && echo "$pid"; done
	return 0
}

# Processes whose command line or working folder lies inside the state folder: a Ray job's
# entrypoint and its children run in a session of their own, inside the Ray temp folder.
inside_state() {
	local proc pid
	for proc in /proc/[0-9]*; do
		pid=${proc#/proc/}
		[[ $pid == "$$" || $pid == "$PPID" ]] && continue
		if [[ $(readlink "$proc/cwd" 2>/dev/null) == "$STATE"/* ]] ||
			{ tr '\0' ' ' <"$proc/cmdline"; } 2>/dev/null | grep -qF -- "$STATE/"; then
			echo "$pid"
		fi
	done
}

# Start "$@" as service $1 in a new session, stdout/stderr to logs/$1.log.
start() {
	local name=$1
	shift
	# The pid is written from inside the new session: it is the session (and group) id.
	# shellcheck disable=SC2016  # $$ and $@ belong to the inner shell
	setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDS/$name.pid" "$@" \
		>"$LOGS/$name.log" 2>&1 </dev/null &
	local i
	for ((i = 0; i < 50; i++)); do
		[[ -s $PIDS/$name.pid ]] && return 0
		sleep 0.1
	done
	die "$name did not start (see $LOGS/$name.log)"
}

# TERM every process in the given list, wait up to $2 seconds, then KILL what is left.
terminate() {
	local pids=$1 wait_s=$2 pid i left
	[[ -z $pids ]] && return 0
	# shellcheck disable=SC2086  # word splitting of the pid list is intended
	kill -TERM $pids 2>/dev/null || true
	for ((i = 0; i < wait_s * 5; i++)); do
		left=""
		for pid in $pids; do alive "$pid" && left+="$pid "; done
		[[ -z $left ]] && return 0
		sleep 0.2
	done
	say "killing processes that ignored SIGTERM: $left"
	# shellcheck disable=SC2086
	kill -KILL $left 2>/dev/null || true
}

# SIGTERM the session leader first: `ray start --block` then shuts its node down in order
# (GCS, raylet, workers) and `mlflow server` its web workers. Whatever is left of the
# session after that is terminated directly.
stop_service() {
	local name=$1 pid members i
	pid=$(pid_of "$name")
	[[ -z $pid ]] && return 0
	members=$(session_members "$pid")
	if [[ -n $members ]]; then
		say "stopping $name (session $pid, $(echo "$members" | wc -l) processes)"
		if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
		for ((i = 0; i < 150; i++)); do
			[[ -z $(session_members "$pid") ]] && break
			sleep 0.2
		done
		terminate "$(session_members "$pid" | tr '\n' ' ')" 10
	fi
	rm -f "$PIDS/$name.pid"
}

down() {
	local i stray
	[[ -d $STATE ]] || {
		say "nothing to stop ($STATE does not exist)"
		return 0
	}
	for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_service "${SERVICES[i]}"; done
	stray=$(inside_state | tr '\n' ' ')
	if [[ -n ${stray// /} ]]; then
		say "stopping processes still running inside $STATE: $stray"
		terminate "$stray" 15
	fi
	rm -f "$STATE/env"
	say "down"
}

# ----------------------------------------------------------------------------- checks

port_free() {
	"$PY" - "$1" <<-'EOF'
		import socket, sys
		s = socket.socket()
		s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is free
		try:
		    s.bind(("", int(sys.argv[1])))
		except OSError:
		    sys.exit(1)
	EOF
}

free_port() {
	"$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait until the command "$@" succeeds; $1 names what we wait for, $2 is its service.
wait_for() {
	local what=$1 service=$2 deadline=$((SECONDS + TIMEOUT))
	shift 2
	until "$@" >/dev/null 2>&1; do
		alive "$(pid_of "$service")" || die "$service exited while waiting for $what; see $LOGS/$service.log"
		((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what; see $LOGS/$service.log"
		sleep 1
	done
	say "$what is ready (${SECONDS}s)"
}

http_ok() { curl -fsS -o /dev/null --max-time 5 "$@"; }

port_open() {
	"$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()' "$1"
}

# Wait for two alive Ray nodes and a working Jobs API, asked the way a client asks (with
# the token). One Python process polls, so that `ray` is imported once.
wait_ray() {
	local rc=0
	"$PY" - "http://$HOST:$DASHBOARD_PORT" "$(pid_of ray-head)" "$(pid_of ray-worker)" "$TIMEOUT" <<-'EOF' || rc=$?
		import os, sys, time
		from ray.job_submission import JobSubmissionClient
		from ray.util.state import list_nodes
		address, pids, timeout = sys.argv[1], sys.argv[2:4], float(sys.argv[4])
		deadline = time.monotonic() + timeout
		while time.monotonic() < deadline:
		    for pid in pids:
		        try:
		            os.kill(int(pid), 0)
		        except OSError:
		            sys.exit(2)
		    try:
		        JobSubmissionClient(address).list_jobs()
		        if sum(n.state == "ALIVE" for n in list_nodes(address=address)) >= 2:
		            sys.exit(0)
		    except Exception:
		        pass
		    time.sleep(1)
		sys.exit(1)
	EOF
	case $rc in
	0) say "Ray (2 nodes, Jobs API) is ready (${SECONDS}s)" ;;
	2) die "a Ray node exited while starting; see $LOGS/ray-head.log and $LOGS/ray-worker.log" ;;
	*) die "timed out after ${TIMEOUT}s waiting for Ray; see $LOGS/ray-head.log" ;;
	esac
}

write_env() {
	local tmp=$STATE/env.tmp
	cat >"$tmp" <<-EOF
		# Written by infra/local/cluster.sh up; source it to use the local cluster.
		# Ray Jobs API (ray job submit, JobSubmissionClient) and the GCS (ray.init)
		export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT
		export RAY_API_SERVER_ADDRESS=http://$HOST:$DASHBOARD_PORT
		export CFEBM_RAY_GCS_ADDRESS=$HOST:$RAY_PORT
		export RAY_AUTH_MODE=token
		export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
		export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0
		# MLflow tracking server (artifacts are proxied by the server to S3)
		export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
		# S3 (moto): s3fs, boto3, DVC and pyarrow read these
		export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT
		export AWS_ACCESS_KEY_ID=testing
		export AWS_SECRET_ACCESS_KEY=testing
		export AWS_DEFAULT_REGION=us-east-1
		export AWS_EC2_METADATA_DISABLED=true
		# Where pipeline runs on this cluster keep data and checkpoints
		export CFEBM_STORAGE=s3://$BUCKET/cfebm
	EOF
	mv "$tmp" "$STATE/env"
}

# ----------------------------------------------------------------------------- up

any_running() {
	local name
	for name in "${SERVICES[@]}"; do alive "$(pid_of "$name")" && return 0; done
	return 1
}

# On any exit of `up` before the end: show the logs and stop what did start.
up_failed() {
	((UP_DONE == 1)) && return 0
	say "up failed; stopping what started"
	tail_logs >&2
	down
}

up() {
	local name port
	for name in ray mlflow moto_server python; do
		[[ -x $BIN/$name ]] || die "$BIN/$name not found: run 'make setup' (or set CFEBM_BIN)"
	done
	mkdir -p "$PIDS" "$LOGS"
	if any_running; then
		if [[ -f $STATE/env ]]; then
			say "already up"
			status
			return 0
		fi
		die "a previous 'up' did not finish; run '$0 down' first"
	fi
	# A fresh start: the S3 server keeps objects in memory, so the tracking database and
	# logs of an earlier cluster would refer to artifacts that no longer exist.
	rm -rf "${PIDS:?}"/*.pid "${LOGS:?}"/* "$STATE/mlflow.db" "$STATE/ray-head" "$STATE/ray-worker"
	# Ray puts unix sockets under its temp folder; their paths may not exceed 107 bytes.
	((${#STATE} <= 50)) || die "CFEBM_CLUSTER_DIR=$STATE is too long for Ray's socket paths (max 50 characters)"
	for port in "$RAY_PORT" "$DASHBOARD_PORT" "$S3_PORT" "$MLFLOW_PORT"; do
		port_free "$port" || die "port $port is in use (set CFEBM_*_PORT, see the top of $0)"
	done
	UP_DONE=0
	trap up_failed EXIT

	# Everything started below sees the same storage and tracking settings that the env file
	# gives clients (what instance roles and the image's environment do on a real cluster).
	export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT AWS_ACCESS_KEY_ID=testing
	export AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
	export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
	export PATH=$BIN:$PATH # Ray job entrypoints run `python`, `dvc` from this environment

	say "S3 (moto) on $HOST:$S3_PORT"
	start s3 "$BIN/moto_server" -H "$HOST" -p "$S3_PORT"
	wait_for "S3" s3 http_ok "http://$HOST:$S3_PORT/moto-api/"
	"$PY" -c 'import boto3, sys; boto3.client("s3").create_bucket(Bucket=sys.argv[1])' "$BUCKET"
	say "bucket s3://$BUCKET"

	# One worker and no job runner: the defaults start 16 processes and take 3 GB. MLflow
	# and Ray start side by side; both are waited for below.
	say "MLflow on $HOST:$MLFLOW_PORT"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL \
		start mlflow "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
		--backend-store-uri "sqlite:///$STATE/mlflow.db" \
		--artifacts-destination "s3://$BUCKET/mlflow"

	# Token authentication with a token of this cluster only (not ~/.ray/auth_token).
	(umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
	export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token RAY_USAGE_STATS_ENABLED=0
	# On SIGTERM a node first waits (30 s by default) for Serve replicas to drain; there are
	# none here, so `down` need not wait.
	export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
	# Ray Train's preemption watcher (one more actor process in every training run) watches
	# for spot instances being reclaimed; the nodes of this cluster are processes here.
	export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0
	# Ray's own helpers (e.g. Ray Train's placement-group cleaner) find the dashboard with
	# address "auto", which fails when other Ray clusters run on the same machine: name it.
	export RAY_API_SERVER_ADDRESS=http://$HOST:$DASHBOARD_PORT
	# Fixed ports for what clients use; every other port is free-picked (0 = any), so two
	# nodes, and other people's Ray, never collide on one machine.
	local common=(--block --node-ip-address="$HOST" --min-worker-port=0 --max-worker-port=0
		--object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) --log-style=record --log-color=false
		--disable-usage-stats)
	say "Ray head on $HOST:$RAY_PORT, dashboard and Jobs API on http://$HOST:$DASHBOARD_PORT"
	start ray-head "$BIN/ray" start --head "${common[@]}" --port="$RAY_PORT" \
		--temp-dir="$STATE/ray-head" --num-cpus="$HEAD_CPUS" --num-gpus=0 \
		--include-dashboard=true --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
		--ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)"
	wait_for "Ray GCS" ray-head port_open "$RAY_PORT"
	say "Ray worker node"
	start ray-worker "$BIN/ray" start --address="$HOST:$RAY_PORT" "${common[@]}" \
		--temp-dir="$STATE/ray-worker" --num-cpus="$WORKER_CPUS" --num-gpus=0 \
		--dashboard-agent-listen-port="$(free_port)"
	wait_for "MLflow" mlflow http_ok "http://$HOST:$MLFLOW_PORT/health"
	wait_ray

	write_env
	UP_DONE=1
	say "up; clients: . $STATE/env"
}

# ----------------------------------------------------------------------------- status

tail_logs() {
	local log
	for log in "$LOGS"/*.log; do
		[[ -f $log ]] || continue
		printf '\n===== %s (last 30 lines)\n' "$log"
		tail -n 30 "$log"
	done
}

status() {
	local name pid state=0
	for name in "${SERVICES[@]}"; do
		pid=$(pid_of "$name")
		if alive "$pid"; then
			printf '  %-11s running  session %-8s %s processes  log %s\n' "$name" "$pid" \
				"$(session_members "$pid" | wc -l)" "$LOGS/$name.log"
		else
			printf '  %-11s stopped\n' "$name"
			state=1
		fi
	done
	if [[ -f $STATE/env ]]; then
		printf '\nclients: . %s\n' "$STATE/env"
		grep '^export' "$STATE/env" | grep -v 'SECRET' | sed 's/^export /  /'
	fi
	return $state
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
*)
	echo "usage: $0 up|down|status" >&2
	exit 2
	;;
esac
