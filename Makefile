# Set-up and the two main commands. `make bench` and `make test` create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# CPU build of PyTorch; the package metadata accepts a range, the set-up pins this one.
TORCH  ?= torch==2.13.0

.PHONY: install bench test test-all clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/recur bench

test: $(STAMP)
	$(BIN)/python -m pytest -n auto

test-all: $(STAMP)
	$(BIN)/python -m pytest -n auto -m ""

clean:
	rm -rf $(VENV) build *.egg-info
