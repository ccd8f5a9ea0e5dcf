# rssqa: `make help` lists the targets. Every target installs what it needs first (make setup).
SHELL := /bin/bash
PROFILE ?= smoke
RUNS ?= runs
PYTHON ?= python3.11
TEST_WORKERS ?= 2
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT := $(RUNS)/$(PROFILE)
# how recipes start a stage's Python: a fresh interpreter, or (make demo) a fork of one that has imported what
# the stages import (python -m rssqa.preload: the 10 to 19 s of imports a stage pays on a small CPU, paid once)
STAGE_PY ?= $(PY)
PRELOAD := $(wildcard stages/*.py) rssqa.report wandb.sdk.launch.inputs.internal
# `make demo` runs the demo profile unless PROFILE is given on the command line
DEMO_PROFILE := $(if $(filter command line environment,$(origin PROFILE)),$(PROFILE),demo)

export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0

.PHONY: help setup lint test test-fast world demo bench gpu-check clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=smoke|demo|paper|dubai (default smoke; demo for 'make demo'), RUNS=runs,"
	@echo "             DATA= (real data: base of sqed's source roots), CLIP_PROFILE= (whose CLIP models sqa uses)"

setup: $(STAMP) ## create .venv and install rssqa with its dependencies (quick when nothing changed)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lint: setup ## ruff over the code
	$(VENV)/bin/ruff check src tests stages bench

# the suite in TEST_WORKERS processes, whole files to each (0: one process); long files first (tests/conftest.py)
PYTEST_WORKERS = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup lint ## lint + the whole test suite in TEST_WORKERS=2 processes (CI runs this)
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=10 $(PYTEST_WORKERS)

test-fast: setup lint ## lint + the tests not marked slow (a few minutes)
	$(VENV)/bin/pytest -m "not slow" -q $(PYTEST_WORKERS)

world: $(OUT)/world/summary.json ## the embedded synthetic world (corpus shards + four sources)
# (a fresh interpreter under make demo too: its imports are light, and it runs while the preloading server imports)
$(OUT)/world/summary.json: conf/$(PROFILE)/world.yaml | $(STAMP)
	$(PY) stages/world.py --config conf/$(PROFILE)/world.yaml --out $(OUT)/world

# ---------------------------------------------------------------------------------------------- stages
# Each stage's local command line; on a cluster (NODES=) the same line is launched on every rank.
CMD_purify = stages/purify.py --config conf/$(PROFILE)/purify.yaml --out $(OUT)/purify
CMD_pretrain = stages/pretrain.py --config conf/$(PROFILE)/pretrain.yaml --out $(OUT)/pretrain
CMD_pretrain_raw = stages/pretrain.py --config conf/$(PROFILE)/pretrain_raw.yaml --out $(OUT)/pretrain_raw
CMD_sqed = stages/sqed.py --config conf/$(PROFILE)/sqed.yaml --out $(OUT)/sqed --data_root $(DATA)
CMD_sqa = stages/sqa.py --config conf/$(PROFILE)/sqa.yaml --out $(OUT)/sqa \
  --data.sqed $(OUT)/sqed --data.clip $(CLIP_OUT)/pretrain/clip_rs --data.generic_clip $(CLIP_OUT)/pretrain_raw/clip_rs
STAGES := purify pretrain pretrain-raw sqed sqa
# a profile reads the embedded world when it has a world config (smoke, demo); paper and your own read real data
WORLD := $(if $(wildcard conf/$(PROFILE)/world.yaml),$(OUT)/world/summary.json,)
# DATA: base of the relative source roots in sqed.yaml; runs/<profile> (the world's sources) unless given,
# the Dubai aerial set beside the repository for the dubai profile
DATA ?= $(if $(filter dubai,$(PROFILE)),../shared/data/dubai-aerial,$(OUT))
# a profile without its own pretrain config (dubai) scores with another profile's CLIP-RS and raw CLIP
CLIP_PROFILE ?= $(if $(wildcard conf/$(PROFILE)/pretrain.yaml),$(PROFILE),demo)
CLIP_OUT := $(RUNS)/$(CLIP_PROFILE)
RAW_CLIP_AFTER ?=
GPUS ?= 8
LAUNCHER ?= slurm

.PHONY: $(STAGES) report scenes seeds
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
	$(STAGE_PY) $(CMD_purify)
# RAW_CLIP_AFTER (make demo: purify's summary): the raw CLIP, off the critical path (world, purify, CLIP-RS, sqa),
# starts beside CLIP-RS once purify has ended, not beside purify as soon as RS-SQED frees a job slot: there it
# slowed purify, then ended long before CLIP-RS, which ran its last minute alone on one core
$(OUT)/pretrain_raw/summary.json: conf/$(PROFILE)/pretrain_raw.yaml $(WORLD) | $(STAMP) $(RAW_CLIP_AFTER)
	$(STAGE_PY) $(CMD_pretrain_raw)
# (the purified run's summary compares itself with the raw run when that has finished; the report always does)
$(OUT)/pretrain/summary.json: conf/$(PROFILE)/pretrain.yaml $(OUT)/purify/summary.json $(WORLD) | $(STAMP)
	$(STAGE_PY) $(CMD_pretrain)
$(OUT)/sqed/summary.json: conf/$(PROFILE)/sqed.yaml $(WORLD) | $(STAMP)
	$(STAGE_PY) $(CMD_sqed)
# prerequisites in this order: with JOBS=2, RS-SQED (two ranks) starts beside purify (two processes), then the two
# one-process CLIP trainings as those end, side by side at the end: the cores stay busy until sqa
$(OUT)/sqa/summary.json: conf/$(PROFILE)/sqa.yaml $(OUT)/sqed/summary.json $(CLIP_OUT)/pretrain/summary.json $(CLIP_OUT)/pretrain_raw/summary.json | $(STAMP)
	$(STAGE_PY) $(CMD_sqa)
ifneq ($(CLIP_PROFILE),$(PROFILE))
# another profile's CLIP models, built by that profile's own rules when missing (its world, not this profile's)
$(CLIP_OUT)/pretrain/summary.json: | $(STAMP)
	$(MAKE) --no-print-directory pretrain PROFILE=$(CLIP_PROFILE)
$(CLIP_OUT)/pretrain_raw/summary.json: | $(CLIP_OUT)/pretrain/summary.json
	$(MAKE) --no-print-directory pretrain-raw PROFILE=$(CLIP_PROFILE)
endif

# whole scenes scored window by window (rssqa scene) and measured against their truth: the world's large
# GeoTIFF scenes, or (a profile without a world: real data) the whole images of RS-SQED's test split
SCENES_FROM = $(if $(WORLD),--index $(OUT)/world/scenes/scenes.json,--sqed $(OUT)/sqed --data $(DATA))
scenes: $(OUT)/scenes/summary.json ## rssqa scene on the world's scenes (or the test area's whole images): the four maps
$(OUT)/scenes/summary.json: $(OUT)/sqa/summary.json $(WORLD) | $(STAMP)
	$(STAGE_PY) stages/scenes.py --scorer $(OUT)/sqa/scorer $(SCENES_FROM) --out $(OUT)/scenes --workers 2

SEEDS ?= 0 1 2 3 4
seeds: $(OUT)/sqa/summary.json | $(STAMP) ## the sqa run's heads trained again under SEEDS= (default 0 1 2 3 4; SEED_MODELS=): the spread, in the report
	$(PY) -m rssqa.tasks.sqa.seeds --run $(OUT)/sqa --seeds $(SEEDS) --workers $(JOBS) $(if $(SEED_MODELS),--models $(SEED_MODELS))

report: | $(STAMP) ## runs/<profile>/report.md from whatever stages have finished
	$(STAGE_PY) -m rssqa.report --runs $(RUNS) --profile $(PROFILE) $(if $(PIPELINE_SECONDS),--pipeline-seconds $(PIPELINE_SECONDS))

# stages that do not depend on each other run side by side (RS-SQED's two ranks beside purify's two processes, then the
# two one-thread CLIP trainings side by side): JOBS=2 keeps two cores busy; JOBS=1 runs one stage at a time
JOBS ?= 2
demo: setup ## the whole pipeline on the embedded world, then the report (PROFILE=demo unless given; JOBS=2)
	@export RSSQA_RUN_GROUP=$${RSSQA_RUN_GROUP:-$(DEMO_PROFILE)-$$(date +%Y%m%d-%H%M%S)}; \
	start=$$(date +%s); \
	sock=$$(mktemp -u $${TMPDIR:-/tmp}/rssqa-XXXXXX.sock); \
	$(PY) -m rssqa.preload serve --socket $$sock --preload $(PRELOAD) & server=$$!; trap "kill $$server 2>/dev/null" EXIT; \
	stage_py="$(PY) -m rssqa.preload run --socket $$sock --"; \
	$(MAKE) --no-print-directory -j$(JOBS) $(if $(wildcard conf/$(DEMO_PROFILE)/world.yaml),scenes RAW_CLIP_AFTER=$(RUNS)/$(DEMO_PROFILE)/purify/summary.json,sqa) \
	  PROFILE=$(DEMO_PROFILE) STAGE_PY="$$stage_py" && \
	$(MAKE) --no-print-directory report PROFILE=$(DEMO_PROFILE) PIPELINE_SECONDS=$$(( $$(date +%s) - start )) STAGE_PY="$$stage_py" && \
	echo "demo ($(DEMO_PROFILE)) done in $$(( $$(date +%s) - start )) s: $(RUNS)/$(DEMO_PROFILE)/report.md"

BENCHES := world shards purify caption pretrain sqed score sqa_head bootstrap
bench: setup ## every benchmark, each against its reference in the same run; JSON + tables under runs/bench/
	@mkdir -p $(RUNS)/bench
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) -m bench.$$b --out $(RUNS)/bench/$$b.json || exit 1; done
	$(PY) -m bench.table $(RUNS)/bench

gpu-check: setup ## paper-profile models on one GPU, about 5 minutes: throughput, MFU, memory (runs/bench/gpu_check.json)
	$(PY) -m bench.gpu_check --out $(RUNS)/bench/gpu_check.json

clean: ## remove the run folders of PROFILE
	rm -rf $(OUT)
