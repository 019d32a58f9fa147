# Two commands for a fresh clone: `make demo` and `make test`. Both do all set-up first;
# set-up is idempotent and takes seconds when already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
RUNNER := build/host/et_bench
RUNNER_SRC := $(wildcard android_bench/*.cpp android_bench/*.h) android_bench/CMakeLists.txt

.PHONY: setup system venv runner demo test test-fast bench clean

setup: system venv runner

system:
	@bash scripts/setup_system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing Python dependencies into $(VENV) ..."
	@# torch first and pinned: the CPU wheel, not the registry's CUDA build. pip's chatter goes
	@# to a log that is shown only when something fails.
	@( $(PY) -m pip install -q torch==2.13.0 && $(PY) -m pip install -q -e '.[dev]' ) \
		>$(VENV)/pip.log 2>&1 || { tail -n 30 $(VENV)/pip.log; echo "pip install failed (full log: $(VENV)/pip.log)"; exit 1; }
	@touch $@

runner: $(RUNNER)

$(RUNNER): $(RUNNER_SRC) $(VENV)/.installed
	@bash android_bench/build_host.sh $(PY) build/host

demo: setup
	@$(BIN)/amc-mobile demo

# One pytest worker per core, at most 4 (each holds a torch and its own session fixtures); each worker's
# torch runs one thread (tests/conftest.py), so workers do not fight over the cores.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))

test: setup
	@$(BIN)/pytest -q -ra -n $(TEST_WORKERS)

test-fast: setup
	@$(BIN)/pytest -q -ra -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf build runs .pytest_cache
