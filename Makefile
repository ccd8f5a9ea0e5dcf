# rssqa: `make help` lists the targets. Every target installs what it needs first (make setup).
SHELL := /bin/bash
PROFILE ?= smoke
RUNS ?= runs
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT := $(RUNS)/$(PROFILE)
# `make demo` runs the demo profile unless PROFILE is given on the command line
DEMO_PROFILE := $(if $(filter command line environment,$(origin PROFILE)),$(PROFILE),demo)

export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0

.PHONY: help setup lint test test-full world demo bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=smoke|demo|paper (default smoke; demo for 'make demo'), RUNS=runs"

setup: $(STAMP) ## create .venv and install rssqa with its dependencies (quick when nothing changed)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lint: setup ## ruff over the code
	$(VENV)/bin/ruff check src tests stages bench

test: setup lint ## lint + the fast test suite (slow tests excluded)
	$(VENV)/bin/pytest -m "not slow" -q

test-full: setup lint ## lint + every test, slow ones included
	$(VENV)/bin/pytest -q

world: $(OUT)/world/summary.json ## the embedded synthetic world (corpus shards + four sources)
$(OUT)/world/summary.json: conf/$(PROFILE)/world.yaml | $(STAMP)
	$(PY) stages/world.py --config conf/$(PROFILE)/world.yaml --out $(OUT)/world

demo: setup ## the whole pipeline on the embedded world (PROFILE=demo unless given)
	$(MAKE) --no-print-directory world PROFILE=$(DEMO_PROFILE)

bench: setup ## every benchmark; JSON + tables under runs/bench/
	@mkdir -p $(RUNS)/bench
	$(PY) bench/world.py --out $(RUNS)/bench/world.json
	$(PY) bench/shards.py --out $(RUNS)/bench/shards.json

clean: ## remove run folders of PROFILE
	rm -rf $(OUT)
