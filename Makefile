PY ?= python3

.PHONY: test demo reproduce bench
test:
	$(PY) -m pytest -q tests

# SmolLM2-135M edited on 2 MQuAKE-hard cases (PreEdited vs CausalEdit), then a before/after table; ~10 min on 2 CPU
# cores, a GPU when there is one (README "Demo"). A finished demo is reused: make demo DEMO_ARGS=--fresh redoes it.
demo:
	$(PY) -m code_edit.demo $(DEMO_ARGS)

# The reference README's two CODE runs on one GPU, then judge + analysis (resumable; see README "make reproduce").
# Extra flags: make reproduce REPRODUCE_ARGS="--judge-base-url URL --judge-model M" (or --small for a CPU smoke run).
reproduce:
	$(PY) scripts/reproduce.py $(REPRODUCE_ARGS)
