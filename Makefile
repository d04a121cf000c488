# Two commands do all the set-up on a fresh machine:
#   make test   create .venv, install torch (pinned CPU build) and spaceft, run the tests
#               (make test-fast: the tests not marked slow, for the inner loop of a change)
#   make demo   the same install, then SPACE self-play on the embedded SmolLM2-135M (about 6 min on 2 cores)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: install test test-fast demo lab lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)   # first, pinned: a looser torch pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/ruff check spaceft tests benchmarks experiments
	$(BIN)/python -m pytest -q

test-fast: install   # the inner loop: every test not marked slow (the end-to-end runs are left to `make test`)
	$(BIN)/ruff check spaceft tests benchmarks experiments
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/spaceft demo

lab: install
	$(BIN)/spaceft lab

bench: install   # spaceft vs TRL: loss check, then speed / MFU / memory (about 25 min on 2 cores, nice'd; --sweep adds K x prompt length)
	$(BIN)/pip install --quiet -e '.[bench]'
	nice -n 19 $(BIN)/python benchmarks/vs_trl.py

lint: install
	$(BIN)/ruff check spaceft tests benchmarks experiments

clean:
	rm -rf $(VENV) runs lab_out
