# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home
export HF_HUB_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib

.PHONY: install demo test lint dev clean

$(BIN)/cohortcast: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so that nothing that depends on it pulls a CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/cohortcast

demo: install
	$(BIN)/cohortcast demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check features models pipelines tests benchmarks
	$(BIN)/mypy

dev: install
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

clean:
	rm -rf $(VENV) workspace .cache dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
