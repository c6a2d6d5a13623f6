# Two commands: `make demo` (the main job) and `make test` (the whole suite). Both set everything up first:
# .venv, torch (the CPU build when there is no CUDA), the project with its dev extras, Redis and PostgreSQL.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVICES := $(PY) -m memory.services

.PHONY: setup demo test bench lint services-up services-down services-status clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "setup: CUDA found; torch is your choice (install a CUDA build of torch>=2.4 in $(VENV) yourself)"; \
	elif ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "setup: no CUDA; installing torch==2.13.0 (CPU build)"; \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	@echo "setup: pip install -e .[dev]"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The engine alone (a few batches, adapters, a chain, a grammar), then a region of 500 NPCs for 60 s through
# npc-worker + scheduler + memory + npc-archiver (tier_scheduler/region.py; plot in .run/region-latency.png).
demo: setup
	@$(SERVICES) run -- /bin/bash -c '$(PY) -m gpu_worker.demo && $(PY) -m tier_scheduler.region'

test: setup
	@$(SERVICES) run -- $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@$(SERVICES) run -- $(PY) -m bench

lint: setup
	@$(VENV)/bin/ruff check .

services-up: setup
	@$(SERVICES) up

services-down:
	@test -x $(PY) && $(SERVICES) down || true

services-status: setup
	@$(SERVICES) status

clean: services-down
	rm -rf .run
