# `make lab`  : create the environment if needed, install everything, open Jupyter on notebooks/
# `make test` : create the environment if needed, install everything, lint, run unit tests then every notebook (smoke profile)
# `make gpu-check` : on a CUDA machine, measure the speed ladder, the T4 path, DDP and every lab's gpu profile
#                    (`make gpu-check ARGS=--tiny` runs the same code on a tiny scale anywhere)
# `make artefacts` : rebuild the reference chain (tokenizers, base model, SFT model) with the recipes, in order
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: lab test unit notebooks lint publish release artefacts gpu-check clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

test: lint unit notebooks

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

# Complete notebooks, smoke profile; a failing exercise check fails the run (COURSE_STRICT_CHECKS).
notebooks: $(STAMP)
	COURSE_SMOKE=1 COURSE_STRICT_CHECKS=1 MPLBACKEND=Agg $(BIN)/python -m pytest -q -p no:cacheprovider \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=300 notebooks/[0-9]*.ipynb

# Line length 120, import order, common bugs; and one format throughout.
lint: $(STAMP)
	$(BIN)/ruff check course_utils tests
	$(BIN)/ruff format --check course_utils tests

publish: $(STAMP)
	$(BIN)/python -m course_utils.publish

# Rewrite notebooks/student/ from the complete notebooks (commit the result).
release: $(STAMP)
	$(BIN)/python -m course_utils.release

# Every shipped reference artefact, remade in dependency order (hours on two CPU cores; each step resumes).
artefacts: $(STAMP)
	$(BIN)/python -m course_utils.recipes all

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

gpu-check: $(STAMP)
	$(BIN)/python -m course_utils.gpu_check $(ARGS)
