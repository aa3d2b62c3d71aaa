# `make demo` and `make test` set up what they need on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench docs clean

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on these machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Until the built-in task exists: SFT a tiny model on HH demonstrations, then IRFT from it.
DEMO_DATA := data=../shared/data/hh_rlhf/helpful-online/test.jsonl.gz max_examples=256 template=hh max_length=192 max_prompt_length=96
demo: setup
	$(PY) -m demoalign tiny-model runs/demo-model
	$(PY) -m demoalign sft model=runs/demo-model $(DEMO_DATA) epochs=4 learning_rate=3e-3 output_dir=runs/demo-sft overwrite=true
	$(PY) -m demoalign irft --config recipes/demo-tiny-hh.yaml model=runs/demo-sft/final overwrite=true

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf runs $(VENV)

docs: setup
	$(PY) -m demoalign.docs README.md
