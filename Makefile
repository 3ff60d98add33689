# The two commands of the README: `make demo` (the workflow on the bundled demo data)
# and `make test` (the whole test suite, slow end-to-end tests included).
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup demo test test-fast clean-demo

setup:
	./scripts/setup.sh

demo: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml

test: setup
	$(BIN)/pytest
	$(BIN)/pytest -m slow

test-fast: setup
	$(BIN)/pytest

clean-demo:
	rm -rf results/demo
