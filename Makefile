# Two entry points for a fresh machine with Python 3.11 and pip:
#   make run    install, build the DVC-versioned data, run the whole pipeline on SmolLM2-135M
#   make test   install, unpack sources, run the test suite
PYTHON ?= python3
VENV ?= .venv
export QALORA_HOME ?= $(CURDIR)/.qalora
PY := $(VENV)/bin/python
QALORA := $(VENV)/bin/qalora
INSTALLED := $(VENV)/.installed
SOURCES := $(QALORA_HOME)/sources/.done
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
# llama-cpp-python has no wheel on PyPI: its sdist is compiled here, without the multimodal library
# (LLAVA_BUILD=OFF: a third of the build, unused by the GGUF consumer test).
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
$(INSTALLED): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install --disable-pip-version-check -q -c requirements.lock -e ".[test]"
	touch $@

sources: $(SOURCES)
$(SOURCES): scripts/fetch_sources.sh | $(INSTALLED)
	bash scripts/fetch_sources.sh $(QALORA_HOME)/sources $(PY)
	touch $@

# data build regenerates data/ from the pinned sources (same bytes, same data.dvc md5) and tracks it.
run: install
	$(QALORA) data build
	$(QALORA) run --params $(PARAMS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(QALORA_HOME)
