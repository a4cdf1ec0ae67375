# cfebm: `make run` and `make test` are all the set-up a fresh machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# glibc clears freshly mapped pages for every large activation; keeping them mapped is
# measurably faster for Langevin on CPU (see `make bench`).
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296
PYTEST_ARGS ?=

.PHONY: setup lock browser readme-images run serve tune ablation submit cluster-up cluster-down compare test bench lint format ui clean

# The environment is the one CI passed with: every package pinned in requirements.lock,
# installed by uv (several times faster than pip; pip if uv cannot be had), then this
# project itself without dependencies. `make lock` re-resolves it (see README).
LOCK := requirements.lock
UV_VERSION ?= 0.13.9
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)" \
		&& $(BIN)/python -m uv pip install -q --compile-bytecode --python $(BIN)/python -r $(LOCK) \
		|| $(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)

# Re-resolve the dependencies of pyproject.toml (newest releases) into a fresh .venv and
# pin what was installed; then `make test`, and commit requirements.lock if it passes.
lock:
	rm -rf $(VENV) && $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip freeze --exclude-editable | grep -v "^uv==" > $(LOCK)
	touch $(STAMP)

# `make run PRESET=cifar10 DATA=cifar-10-python.tar.gz` runs a preset of presets/ on your data.
PRESET ?=
DATA ?=
run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pipelines.run $(if $(PRESET),--preset $(PRESET)) $(if $(DATA),--data $(DATA))

# The README's pictures (docs/images/) from the last `make run`: the finest stage's
# samples and coarse-to-fine chain, as the train stage wrote them.
readme-images:
	@last=$$(ls -d plots/images/stage* 2>/dev/null | sort -V | tail -1); \
	test -n "$$last" || { echo "no plots/images/stage*: run make run first" >&2; exit 1; }; \
	mkdir -p docs/images && cp "$$last/samples.png" "$$last/chain.png" docs/images/ && \
	echo "docs/images/{samples,chain}.png from $$last"

# The Ray Tune search of the Langevin sampler (its result: tune/best.json).
tune: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro tune

# Coarse to fine against the finest resolution directly and against progressive growing
# without coarse-to-fine sampling, at equal compute (needs the data and features stages).
ablation: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro pyramid features
	$(BIN)/python -m pipelines.ablation

# The pipeline as a Ray job on a running cluster (RAY_ADDRESS=http://head:8265, or the local
# one of infra/local/cluster.sh); SUBMIT_ARGS="-- COMMAND..." runs something else.
SUBMIT_ARGS ?=
submit: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH infra/local/submit.sh $(SUBMIT_ARGS)

# A cluster on this machine (127.0.0.1): Ray head + a second Ray node, moto S3, MLflow
# server (infra/local/cluster.sh; state, logs and the clients' env file in .cluster/).
cluster-up: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH infra/local/cluster.sh up

cluster-down:
	PATH=$(CURDIR)/$(BIN):$$PATH infra/local/cluster.sh down

# The last pipeline runs side by side from MLflow: parameters that differ, FID/KID per stage,
# tune's best score, training time (COMPARE_ARGS="--last 3 --format csv").
COMPARE_ARGS ?=
compare: $(STAMP)
	$(BIN)/python -m pipelines.compare $(COMPARE_ARGS)

# The registered model over HTTP (POST /invocations; see README, "Serving the energy").
MODEL ?= models:/cfebm-digits@latest
SERVE_PORT ?= 5001
serve: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} \
		mlflow models serve -m "$(MODEL)" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

# The MLflow UI test drives Debian's headless Chromium (no browser download).
browser:
	command -v chromium >/dev/null || { apt-get install -y -q --no-install-recommends chromium \
		|| { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; }

# The suite waits on services more than it computes (Ray start-up, servers, polling), so
# three pytest workers share the two cores; each test file stays on one worker
# (module-scoped runs are made once); pytest-xdist hands out the files with the most tests
# first, which spreads the end-to-end files over the run (see tests/conftest.py).
PYTEST_WORKERS ?= 3
test: $(STAMP) browser
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# (MLflow's GenAI job runner is off: it starts two more processes that this project never uses)
ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --workers 1 --host 127.0.0.1 --port 5000

clean:
	rm -rf runs data models outputs tune .pytest_cache
