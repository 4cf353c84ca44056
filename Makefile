# Set-up and the two main commands. `make bench` and `make test` create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# CPU build of PyTorch; the package metadata accepts a range, the set-up pins this one.
TORCH  ?= torch==2.13.0
# The index torch is installed from. Empty (the default): pip's own configuration. Where that index
# serves CUDA builds of torch (PyPI on Linux x86_64: several GB), take the CPU build from PyTorch's
# CPU wheel index: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install bench test test-all clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)
	@echo "recur is installed in $(VENV): '. $(BIN)/activate' puts recur on the PATH of this shell; or call $(BIN)/recur"

bench: $(STAMP)
	$(BIN)/recur bench

test: $(STAMP)
	$(BIN)/python -m pytest -n auto

test-all: $(STAMP)
	$(BIN)/python -m pytest -n auto -m "not gpus"

clean:
	rm -rf $(VENV) build *.egg-info
