#!/usr/bin/env bash
# Every GPU-only check of this repository in one run (<= 8 minutes on an H100/H200), results under OUT_DIR:
#   bash scripts/gpu_check.sh OUT_DIR
# Before, on a machine with network: bash scripts/gpu_bundle.sh (wheels + tokenizer into .gpu/, used when
# the GPU machine's Python lacks a package). Writes:
#   OUT_DIR/calibration.json  benchmarks/gpu_calibrate.py: every code path timed at the runs' per-device
#                             batches (bridge / LoRA / XSum micro-steps, label scoring, features, generate,
#                             LLMLingua per item, load, the per-op cost, 1-3 packed processes), peak memory
#                             vs resources.training_gb, and the one-pass label scorer against the per-label
#                             path on CUDA (float32 and bf16); `costs.load_calibration` reads it as it is
#                             (copy it to benchmarks/calibration.json for the planner's default table)
#   OUT_DIR/plan.txt          python -m telepathy plan +phase=all on 4 x H100 calibrated by that file
#   OUT_DIR/env.txt           nvidia-smi, python and package versions
#   OUT_DIR/check.log         everything printed
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
PY=${PYTHON:-python3}
if ! $PY -c "import omegaconf, hydra, llmlingua, nltk" 2>/dev/null; then
    [ -d .gpu/wheels ] || { echo "missing packages and no .gpu/wheels: run scripts/gpu_bundle.sh first"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .gpu/wheels/*.whl || exit 2
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOK=()
[ -d .gpu/tokenizer ] && TOK=(--tokenizer .gpu/tokenizer)
{ nvidia-smi; $PY -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)"; } > "$OUT/env.txt" 2>&1
status=0
timeout 450 $PY -m benchmarks.gpu_calibrate --out "$OUT/calibration.json" --budget-s 380 "${TOK[@]}" || status=$?
if [ -s "$OUT/calibration.json" ] && [ -n "${TELEPATHY_DATA:-}" ]; then   # the planner needs the data's token counts
    timeout 90 $PY -m telepathy plan +phase=all cluster.gpus=4 cluster.device=h100 --out "$OUT/plan" \
        --calibrate-from /nonexistent > "$OUT/plan.txt" 2>&1 || true
fi
echo "gpu_check: exit $status; results in $OUT"
exit $status
