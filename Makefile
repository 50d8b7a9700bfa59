# `make demo` and `make test` set everything up from nothing.
# torch is pinned to the CPU build that lies on this machine's disk; override with `make TORCH=torch==2.5.1`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HF_STAMP := $(VENV)/.installed-hf
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: venv demo test lint typecheck bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	touch $(STAMP)

# The tests also run tiny Hugging Face models, the logging sinks' libraries, the training frameworks, the dashboard
# (with a headless browser) and draw with matplotlib; `make demo` does not need them.
$(HF_STAMP): $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,hf,report,tensorboard,wandb,mlflow,dashboard,dashboard-test,lightning,trl,accelerate]"
	touch $(HF_STAMP)

# What the commands the demo and the README print need besides the core: matplotlib for `report --png`.
$(DEMO_STAMP): $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,demo,report]"
	touch $(DEMO_STAMP)

venv: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/noisescale demo

test: $(HF_STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -e ".[bench]"
	-$(BIN)/pip uninstall -q -y torchvision
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
