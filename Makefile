# Every target sets up its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The torchvision oracle of deform_conv2d (CPU use of a CUDA build, ~5.5 GB; local wheels on
# the project's machines). `make test TORCHVISION=` skips it: those tests then skip cleanly.
TORCHVISION ?= torch==2.14.1 torchvision==0.29.1

# Runs the whole suite; pytest's "no tests ran" (exit 5) fails like any other failure.
test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]" $(TORCHVISION)
	$(BIN)/python -m pytest -q

demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[examples]"
	$(BIN)/python examples/warp_demo.py

# CPU benchmarks against scipy, torch and torchvision.
bench: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]" $(TORCHVISION)
	$(BIN)/python -m deformops.bench sample
	$(BIN)/python -m deformops.bench conv

clean:
	rm -rf $(VENV) build *.egg-info examples/out
