# User-facing entry points. Every target builds or refreshes the locked environment first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install repro smoke ui test lint strip-notebooks bench lock clean gpu-bundle gpu-check-dry

install: $(STAMP)

# The environment is rebuilt whenever the lock file or the project metadata changes.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The same dvc.yaml stages on synthetic data with a tiny UNet, offline, in .smoke/ (see
# scripts/smoke.py); the user's own data, models and MLflow store are never touched.
smoke: $(STAMP)
	$(BIN)/python scripts/smoke.py

# The MLflow UI over the local store (the smoke project's: make ui STORE=.smoke/mlflow.db).
STORE ?= mlflow.db
ui: $(STAMP)
	@MLFLOW_TRACKING_URI=sqlite:///$(abspath $(STORE)) $(BIN)/python -c \
		"from pipeline.tracking import ui_url; print('The runs table:', ui_url())"
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath $(STORE)) --host 127.0.0.1 --port 5000

# Both cores: test files run side by side (pytest-xdist), each file whole on one worker, in its
# order (the smoke project's tests change one project in turn), the files in the order
# tests/conftest.py gives them. JOBS=0: one process.
JOBS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=15

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# examples/*.ipynb are committed without outputs (tests/test_notebooks.py fails on any): run this
# after working in one, before committing it.
strip-notebooks: $(STAMP)
	$(BIN)/python scripts/strip_notebooks.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_vs_diffusers.py

# The GPU check (scripts/gpu_check.sh): .gpu/ holds what a lent GPU machine lacks and the script,
# run there as `bash .gpu/check.sh OUT`; the dry run is the same script on this CPU, tiny sizes.
gpu-bundle:
	PYTHON=$(PYTHON) bash scripts/gpu_bundle.sh

gpu-check-dry: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh .gpu-dry --dry

# Regenerates the lock file from pyproject.toml (needs network and uv).
lock:
	$(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv pip compile pyproject.toml --extra dev --extra bench --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .gpu .gpu-dry
