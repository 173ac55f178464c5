# Two commands on a fresh machine (each sets up .venv first when needed):
#   make demo   run the main job end to end on the embedded default model
#   make test   run the test suite
VENV ?= .venv
# This machine has no model hub; everything runs from local files.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/frugalray pipeline --config jobs/configs/pipeline.yaml

test: setup
	$(VENV)/bin/python -m pytest -v --durations=25

test-fast: setup
	$(VENV)/bin/python -m pytest -v -m "not slow"

lint: setup
	$(VENV)/bin/ruff check platform jobs serve tests bench
