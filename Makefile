# The two set-up commands: `make lab` and `make test`. Both install what is missing.
#
# torch is installed first and on its own: TORCH picks the build.
#   CPU machines (default):  make lab
#   a specific CUDA build:   make lab TORCH_PIP_ARGS="--index-url <PyTorch's wheel index for your CUDA>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.sftkit-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install lab test doctor clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(PIP) install -q -e ".[lab,test]"
	$(BIN)/sftkit prepare
	$(BIN)/python -m ipykernel install --sys-prefix --name sftkit --display-name "sftkit (Python 3)" >/dev/null
	@touch $(STAMP)

lab: install
	bash lab/start.sh

test: install
	bash .ci/browser-deps.sh
	$(BIN)/python -m pytest

doctor: install
	$(BIN)/sftkit doctor

clean-venv:
	rm -rf $(VENV)
