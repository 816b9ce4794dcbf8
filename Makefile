PY ?= python3

.PHONY: test demo reproduce bench
test:
	$(PY) -m pytest -q tests
