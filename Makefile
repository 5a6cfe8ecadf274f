# make demo: set up and run the main job.  make test: set up and run the tests.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
LLMOPS  = $(VENV)/bin/llmops
STAMP   = $(VENV)/.installed

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export MLFLOW_DISABLE_TELEMETRY = true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(LLMOPS) data generate support-tickets --scenario new-product --n 200 --out .llmops/data/new-product.parquet
	$(LLMOPS) train support-router
	$(LLMOPS) train moderation
	$(LLMOPS) train rewriter
	$(LLMOPS) models

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/train.py --json

clean:
	ray stop --force >/dev/null 2>&1 || true
	rm -rf .llmops
