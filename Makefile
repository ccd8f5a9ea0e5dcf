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

.PHONY: help setup lint test test-fast world demo bench clean

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

test: setup lint ## lint + the whole test suite (about 6 minutes on 2 cores; CI runs this)
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=10

test-fast: setup lint ## lint + the tests not marked slow (about a minute)
	$(VENV)/bin/pytest -m "not slow" -q

world: $(OUT)/world/summary.json ## the embedded synthetic world (corpus shards + four sources)
$(OUT)/world/summary.json: conf/$(PROFILE)/world.yaml | $(STAMP)
	$(PY) stages/world.py --config conf/$(PROFILE)/world.yaml --out $(OUT)/world

# ---------------------------------------------------------------------------------------------- stages
# Each stage's local command line; on a cluster (NODES=) the same line is launched on every rank.
CMD_purify = stages/purify.py --config conf/$(PROFILE)/purify.yaml --out $(OUT)/purify
CMD_pretrain = stages/pretrain.py --config conf/$(PROFILE)/pretrain.yaml --out $(OUT)/pretrain
CMD_pretrain_raw = stages/pretrain.py --config conf/$(PROFILE)/pretrain_raw.yaml --out $(OUT)/pretrain_raw
CMD_sqed = stages/sqed.py --config conf/$(PROFILE)/sqed.yaml --out $(OUT)/sqed
CMD_sqa = stages/sqa.py --config conf/$(PROFILE)/sqa.yaml --out $(OUT)/sqa \
  --data.sqed $(OUT)/sqed --data.clip $(OUT)/pretrain/clip_rs --data.generic_clip $(OUT)/pretrain_raw/clip_rs
STAGES := purify pretrain pretrain-raw sqed sqa
# a profile reads the embedded world when it has a world config (smoke, demo); paper and your own read real data
WORLD := $(if $(wildcard conf/$(PROFILE)/world.yaml),$(OUT)/world/summary.json,)
GPUS ?= 8
LAUNCHER ?= slurm

.PHONY: $(STAGES) report
ifdef NODES
$(STAGES): | $(STAMP)
	$(PY) -m rssqa.launch $(subst -,_,$@) --profile $(PROFILE) --nodes $(NODES) --gpus $(GPUS) --launcher $(LAUNCHER) \
	  --runs $(RUNS) $(if $(DRY_RUN),--dry-run) -- $(CMD_$(subst -,_,$@))
else
purify: $(OUT)/purify/summary.json ## captioner-filter purification of the corpus (NODES=, GPUS=, DRY_RUN=1 on a cluster)
pretrain: $(OUT)/pretrain/summary.json ## CLIP-RS on the purified corpus
pretrain-raw: $(OUT)/pretrain_raw/summary.json ## the same CLIP on the raw corpus (the generic_clip ablation)
sqed: $(OUT)/sqed/summary.json ## RS-SQED: eight methods x four sources, per-image OA
sqa: $(OUT)/sqa/summary.json ## RS-SQA: train, compare with baselines, recommend methods
endif

$(OUT)/purify/summary.json: conf/$(PROFILE)/purify.yaml $(WORLD) | $(STAMP)
	$(PY) $(CMD_purify)
$(OUT)/pretrain_raw/summary.json: conf/$(PROFILE)/pretrain_raw.yaml $(WORLD) | $(STAMP)
	$(PY) $(CMD_pretrain_raw)
# the raw model first (order only), so that the purified run's summary compares the two
$(OUT)/pretrain/summary.json: conf/$(PROFILE)/pretrain.yaml $(OUT)/purify/summary.json $(WORLD) | $(STAMP) $(OUT)/pretrain_raw/summary.json
	$(PY) $(CMD_pretrain)
$(OUT)/sqed/summary.json: conf/$(PROFILE)/sqed.yaml $(WORLD) | $(STAMP)
	$(PY) $(CMD_sqed)
# prerequisites in this order: with JOBS=2 the raw CLIP runs beside purify, then RS-SQED beside the CLIP-RS
$(OUT)/sqa/summary.json: conf/$(PROFILE)/sqa.yaml $(OUT)/pretrain_raw/summary.json $(OUT)/pretrain/summary.json $(OUT)/sqed/summary.json | $(STAMP)
	$(PY) $(CMD_sqa)

report: | $(STAMP) ## runs/<profile>/report.md from whatever stages have finished
	$(PY) -m rssqa.report --runs $(RUNS) --profile $(PROFILE)

# stages that do not depend on each other run side by side (RS-SQED beside purify, then the raw CLIP):
# one-thread stages, so JOBS=2 keeps two cores busy; JOBS=1 runs one stage at a time
JOBS ?= 2
demo: setup ## the whole pipeline on the embedded world, then the report (PROFILE=demo unless given; JOBS=2)
	@export RSSQA_RUN_GROUP=$${RSSQA_RUN_GROUP:-$(DEMO_PROFILE)-$$(date +%Y%m%d-%H%M%S)}; \
	start=$$(date +%s); \
	$(MAKE) --no-print-directory -j$(JOBS) sqa PROFILE=$(DEMO_PROFILE) && \
	$(MAKE) --no-print-directory report PROFILE=$(DEMO_PROFILE) && \
	echo "demo ($(DEMO_PROFILE)) done in $$(( $$(date +%s) - start )) s: $(RUNS)/$(DEMO_PROFILE)/report.md"

BENCHES := world shards purify pretrain sqed score
bench: setup ## every benchmark, each against its reference in the same run; JSON + tables under runs/bench/
	@mkdir -p $(RUNS)/bench
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) -m bench.$$b --out $(RUNS)/bench/$$b.json || exit 1; done
	$(PY) -m bench.table $(RUNS)/bench

clean: ## remove the run folders of PROFILE
	rm -rf $(OUT)
