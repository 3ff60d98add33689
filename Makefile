# The two commands of the README: `make demo` (the workflow on the bundled demo data)
# and `make test` (the whole test suite, slow end-to-end tests included).
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup demo test test-fast lint clean-demo

setup:
	./scripts/setup.sh

# config/config.yaml, the workflow's default config, is the demo
demo: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup lint
	$(BIN)/pytest
	$(BIN)/pytest -m slow

test-fast: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/snakemake --lint

clean-demo:
	rm -rf results/demo
