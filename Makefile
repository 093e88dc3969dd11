# Every target sets up its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runs the whole suite; pytest's "no tests ran" (exit 5) fails like any other failure.
test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pytest -q

demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[examples]"
	$(BIN)/python examples/warp_demo.py

# CPU benchmark of the sampling ops against scipy and torch (torch 2.13.0 is the local CPU wheel).
bench: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]" "torch==2.13.0"
	$(BIN)/python -m deformops.bench sample

clean:
	rm -rf $(VENV) build *.egg-info examples/out
