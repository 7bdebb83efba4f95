# Set-up and entry points. `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

# Offline, project-local state: the Prefect home and the MLflow store live in this folder.
export PATH := $(BIN):$(PATH)
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo drift-demo label feedback test test-fast lint format mlflow-ui prefect-ui clean

# torch first, pinned to the CPU wheel on these machines' disk: pyproject.toml declares a range,
# which the installed torch then satisfies (no CUDA build pulled). On a GPU machine:
# make install TORCH=torch (or your CUDA build's pin, from its index).
TORCH ?= torch==2.13.0
# Test processes of `make test` (pytest-xdist); on 2 cores the second overlaps the first one's waits on servers
TEST_WORKERS ?= 2

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install  ## Run the whole pipeline on the embedded default and print the evaluation
	$(BIN)/rlhf run $(ARGS)

DRIFT_DEMO := traffic/drift-demo

drift-demo: install  ## After `make demo`: simulate a clean and a drifted (new_intent) window, monitor both, print the reports
	rm -rf $(DRIFT_DEMO)
	$(BIN)/rlhf traffic --kind clean --out $(DRIFT_DEMO)
	$(BIN)/rlhf traffic --kind new_intent --out $(DRIFT_DEMO)
	$(BIN)/rlhf monitor --traffic '$(DRIFT_DEMO)/window_*.jsonl' --all --force --report $(ARGS)

label: install  ## The ranking page on 127.0.0.1:8000 for the champion's samples (prints the rater link); ARGS="--k 4 --port P ..."
	$(BIN)/rlhf label $(ARGS)

feedback: install  ## Learn from new feedback batches: retrain the reward model, continue from the champion, gate
	$(BIN)/rlhf feedback $(ARGS)

test: install  ## The full test suite, in TEST_WORKERS processes (tests sharing a trained stack or live servers share one)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: install  ## Math, data and config tests only (seconds)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: install  ## ruff (lint + format check) and the import-layer contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install  ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

mlflow-ui: install  ## MLflow UI on the local store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: install  ## Prefect UI with the demo's flow runs
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

clean:  ## Remove run outputs and local stores (keeps .venv)
	rm -rf outputs mlflow.db mlartifacts .prefect .serve .mlflow-server tests/artifacts

# --- Servers: Prefect + MLflow tracking server, deployments and a worker (docs/deployments.md) ---
RLHF_PREFECT_PORT ?= 4200
RLHF_MLFLOW_PORT ?= 5000

.PHONY: serve stop install-browser install-postgres

serve: install  ## Prefect and MLflow servers on 127.0.0.1, the work pool, every deployment, a worker
	RLHF_BIN=$(BIN) RLHF_PREFECT_PORT=$(RLHF_PREFECT_PORT) RLHF_MLFLOW_PORT=$(RLHF_MLFLOW_PORT) bash scripts/serve.sh

stop:  ## Stop what `make serve` started (by the PIDs in .serve/)
	bash scripts/stop.sh

install-browser: install  ## Debian's chromium and Playwright for Python, for tests/integration/test_browser_ui.py (needs root)
	RLHF_BIN=$(BIN) bash scripts/install-chromium.sh

install-postgres: install  ## Debian's PostgreSQL and psycopg, for tests/integration/test_mlflow_postgres.py (needs root)
	RLHF_BIN=$(BIN) bash scripts/install-postgres.sh

# --- Benchmarks (docs/benchmarks.md): figures, never timed tests; results in bench/results/ ---
BENCH := PYTHONPATH=$(CURDIR):$(CURDIR)/bench $(BIN)/python

.PHONY: bench bench-ppo bench-pipeline bench-demo bench-growth bench-validation

bench: bench-ppo bench-pipeline bench-demo bench-growth  ## Every benchmark below, one after another (an hour or more on 2 CPUs)

bench-ppo: install  ## Our PPO vs TRL 1.12's PPOTrainer: episodes/s, tokens/s, reward gain (creates bench/.venv-trl12)
	$(BENCH) bench/bench_ppo.py $(BENCH_ARGS)

bench-pipeline: install  ## Full flow vs the same stage functions called bare: Prefect + MLflow overhead
	$(BENCH) bench/bench_pipeline.py $(BENCH_ARGS)

bench-demo: install  ## `rlhf run` at the default config: per-stage wall time, peak RSS, PPO time split
	$(BENCH) bench/bench_demo.py $(BENCH_ARGS)

bench-growth: install  ## PPO step time vs batch and length; validation and monitoring rows/s vs rows
	$(BENCH) bench/bench_growth.py ppo
	$(BENCH) bench/bench_growth.py validation
	$(BENCH) bench/bench_growth.py monitor

bench-validation: install  ## Validating 10,000 preference rows (issue 3)
	$(BENCH) bench/bench_validation.py --repeats 5
