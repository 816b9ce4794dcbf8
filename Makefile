# `make test` / `make demo` set up .venv on first use (scripts/setup_env.sh; a stamp makes later runs install
# nothing). PY=python make test uses an environment you already have instead.
VENV := .venv
STAMP := $(VENV)/.code-edit-installed
ifeq ($(origin PY), undefined)
PYTHON := $(VENV)/bin/python
SETUP := $(STAMP)
else
PYTHON := $(PY)
SETUP :=
endif

.PHONY: test demo reproduce setup
test: $(SETUP)
	$(PYTHON) -m pytest tests

# SmolLM2-135M edited on 2 MQuAKE-hard cases (PreEdited vs CausalEdit), then a before/after table; ~10 min on 2 CPU
# cores, a GPU when there is one (docs/running.md "Demo"). A finished demo is reused: make demo DEMO_ARGS=--fresh.
demo: $(SETUP)
	$(PYTHON) -m code_edit.demo $(DEMO_ARGS)

# The reference README's two CODE runs on one GPU, then judge + analysis (resumable; docs/running.md).
# Extra flags: make reproduce REPRODUCE_ARGS="--judge-base-url URL --judge-model M" (or --small for a CPU smoke run).
reproduce: $(SETUP)
	$(PYTHON) scripts/reproduce.py $(REPRODUCE_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
