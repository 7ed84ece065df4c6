#!/usr/bin/env bash
# Token Prepending across seeds (docs/RESULTS.md, "Token Prepending across seeds"): stage 2 from
# one stage-1 checkpoint, with `--tp-layers 1-7` and with `none`, three seeds each. Within a seed
# both runs get the same initialisation of the new parts and the same data order; they differ
# only in Token Prepending. Each run is then evaluated on whole dev files (configs/eval/
# mining_effect.yaml: STS-B(en), SICK, STS-B(zh), XQuAD-en) and TNEWS (configs/eval/tnews.yaml).
# The stage-2 data adds what the recipe lacked: TNEWS train as example-based classification (the
# masked classification loss on real text), OCNLI 10k, and zh_triplets decontaminated against the
# Chinese dev set it overlaps; STS-B train is no longer weighted up.
# STAGE1 defaults to the 40-step stage 1 of configs/smollm2/mining_effect.sh; STEPS to a short
# stage 2 that fits a session on a 2-core CPU (about 8 minutes per run with its evaluation).
# Needs: pip install -e . and the datasets under ../shared/data (see configs/smollm2/stage1.yaml).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/tp_ablation}
STAGE1=${STAGE1:-runs/mining_effect/current}
STEPS=${STEPS:-24}
SEEDS=${SEEDS:-"1 2 3"}
DATA=../shared/data
mkdir -p "$OUT/data"
step() { echo "=== $(date -u +%H:%M:%S) $*"; /usr/bin/time -f "=== %e s, peak RSS %M KiB" "$@"; }

[ -f "$OUT/data/snli_triplets.jsonl" ] || step tpembed-prepare nli-triplets $DATA/snli_en/validation.jsonl "$OUT/data/snli_triplets.jsonl"
[ -f "$OUT/data/cmrc2018.jsonl" ] || step tpembed-prepare drop-empty $DATA/cmrc2018_trial/train.jsonl "$OUT/data/cmrc2018.jsonl"
[ -f "$OUT/data/clean/train.jsonl" ] || step tpembed-decontaminate $DATA/zh_triplets_text2vec/train.jsonl \
  --eval $DATA/stsb_zh/validation.jsonl --output-dir "$OUT/data/clean" --no-progress --overwrite

cat > "$OUT/stage2.yaml" <<YAML
data:
  datasets:
    - {name: snli_triplets, path: $OUT/data/snli_triplets.jsonl, instruction: "Given a premise, retrieve a hypothesis that is entailed by the premise"}
    - {name: zh_triplets, path: $OUT/data/clean/train.jsonl, instruction: 检索语义相似的文本}
    - {name: cmrc2018, path: $OUT/data/cmrc2018.jsonl, instruction: 给定一个问题，检索能回答该问题的段落}
    - {name: tnews_train, path: $DATA/tnews/train.jsonl, task: classification, instruction: Classify the fine-grained category of the given news title}
    - {name: stsb_en_train, path: $DATA/stsb_en/train.jsonl, task: sts, instruction: Retrieve semantically similar text, batch_size: 48}
    - {name: sick_train, path: $DATA/sick/train.jsonl, task: sts, instruction: Retrieve semantically similar text, batch_size: 48}
    - {name: snli_pairs, path: $DATA/snli_en/validation.jsonl, task: sts, instruction: Retrieve semantically similar text, batch_size: 48}
    - {name: ocnli_train, path: $DATA/ocnli/train_10k.jsonl, task: sts, instruction: 检索语义相似的文本, batch_size: 48}
    - {name: stsb_zh_train, path: $DATA/stsb_zh/train.jsonl, task: sts, instruction: 检索语义相似的文本, batch_size: 48}
YAML

for seed in $SEEDS; do
  for tp in 1-7 none; do
    name=tp_${tp/-/_}_seed$seed
    [ -f "$OUT/$name/checkpoints/step-$(printf %08d "$STEPS")/COMPLETE" ] || step python -m accelerate.commands.launch \
      --num_processes 1 train/stage2.py --config configs/smollm2/stage2.yaml --config "$OUT/stage2.yaml" \
      --init-from "$STAGE1" --tp-layers "$tp" --seed "$seed" --max-steps "$STEPS" --save-every "$STEPS" \
      --warmup-steps 3 --output-dir "$OUT/$name" --report-to none --progress-bar false
    [ -f "$OUT/eval_$name/results.json" ] || step tpembed-eval "$OUT/$name" --tasks configs/eval/mining_effect.yaml \
      --tasks configs/eval/tnews.yaml --passage-max-len 256 --output-dir "$OUT/eval_$name" --no-progress
  done
done
python configs/smollm2/tables.py --seeds "$OUT"
