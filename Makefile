# `make train` and `make test` each do all set-up on a fresh machine: a virtual environment in
# .venv, effllm installed into it (editable) with the tested versions of constraints.txt, and the
# embedded corpus prepared into data/stdlib.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DATA := data/stdlib
RECIPE ?= dense_tiny
RUN ?= runs/$(RECIPE)-$(shell date +%Y%m%d-%H%M%S)
ARGS ?=
# Test workers (pytest-xdist): on two cores two ran the suite in 6.0 minutes, one process in 7.9 (README, "The
# test suite"); JOBS=0 runs it in one process. worksteal: an idle worker takes tests from a busy one.
JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(JOBS) --dist worksteal

.PHONY: train resume test test-fast setup prepare clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

setup: $(INSTALLED)

$(DATA)/manifest.json: | $(INSTALLED)
	$(BIN)/effllm prepare --out $(DATA)

prepare: $(DATA)/manifest.json

train: $(INSTALLED) $(DATA)/manifest.json
	$(BIN)/effllm train $(RECIPE) --data-dir $(DATA) --out-dir $(RUN) $(ARGS)

# Continue a run where it stopped (its own recipe, config and lr schedule), e.g.
#   make resume RUN=runs/dense_tiny-20261201-120000 ARGS='--max-steps 1200'
resume: $(INSTALLED) $(DATA)/manifest.json
ifeq ($(origin RUN),file)
	@echo "make resume needs the run to continue: make resume RUN=runs/<recipe>-<time> [ARGS='--max-steps N']" >&2; exit 2
endif
	$(BIN)/effllm train $(RECIPE) --out-dir $(RUN) --resume $(ARGS)

# ruff (its settings are in pyproject.toml) lints the whole tree before the suite runs.
test: $(INSTALLED) $(DATA)/manifest.json
	$(BIN)/ruff check .
	$(PYTEST)

# The fast tier: every test module, no test marked slow (training runs, torchrun launches, compiles).
test-fast: $(INSTALLED) $(DATA)/manifest.json
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) $(DATA) *.egg-info
