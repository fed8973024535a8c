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

.PHONY: train test setup prepare clean

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

test: $(INSTALLED) $(DATA)/manifest.json
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DATA) *.egg-info
