# semmix: `make study` runs the default study, `make test` the tests; both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STUDY  ?= default
RUN    ?= $(STUDY)

.PHONY: setup study test test-fast lab figures readme-figures clean-outputs

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "semmix needs Python 3.11 (found $$($(PYTHON) --version 2>&1)); run: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)                     ## create .venv with the pinned requirements

study: $(STAMP)                     ## run params/$(STUDY).yaml into outputs/$(RUN)/
	$(PY) -m semmix_lib.pipeline params/$(STUDY).yaml --run $(RUN)

test: $(STAMP)                      ## the whole test suite: notebooks, torchrun and the real-browser test
	PY=$(PY) bash tests/browser/setup.sh
	$(PY) -m pytest

test-fast: $(STAMP)                 ## library tests only: no notebook runs, no browser
	$(PY) -m pytest -m "not slow and not browser"

lab: $(STAMP)                       ## JupyterLab on the notebooks (default parameters)
	$(VENV)/bin/jupyter lab notebooks/

figures: $(STAMP)                   ## rewrite the tables and figures of outputs/$(RUN) from saved files
	$(PY) -m semmix_lib.pipeline outputs/$(RUN) --stages analyze --force

readme-figures: figures             ## copy the default study's figures shown in the README to docs/figures/
	cp outputs/$(RUN)/analyze/ece_vs_accuracy.png outputs/$(RUN)/analyze/mixing_grid.png \
	   outputs/$(RUN)/analyze/reannotation.png docs/figures/

clean-outputs:                      ## delete every run folder under outputs/
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
