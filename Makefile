PY ?= python3

.PHONY: test demo reproduce bench
test:
	$(PY) -m pytest -q tests

# The reference README's two CODE runs on one GPU, then judge + analysis (resumable; see README "make reproduce").
# Extra flags: make reproduce REPRODUCE_ARGS="--judge-base-url URL --judge-model M" (or --small for a CPU smoke run).
reproduce:
	$(PY) scripts/reproduce.py $(REPRODUCE_ARGS)
