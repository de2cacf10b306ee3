# Two entry points for users: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: setup demo test test-fast clean-demo

# Keep an installed torch (a CUDA build on a GPU node); otherwise install the CPU build. Then pin that
# torch in a constraints file so no dependency can swap it for a multi-GB CUDA download.
$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==$(TORCH_CPU_VERSION)
	$(VPY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(VPY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,deepspeed]"
	touch $@

setup: $(VENV)/.installed

# The flagship in miniature: NVILA (Dynamic-S2, 2x2 token compression, packed conversations) on CPU.
demo: setup
	$(VENV)/bin/launch --config configs/nvila_tiny.yaml --nproc 2 run.name=demo

test: setup
	$(VPY) -m pytest -q -ra --durations=25

test-fast: setup
	$(VPY) -m pytest -q -m "not slow"
