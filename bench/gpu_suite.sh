#!/usr/bin/env bash
# Every GPU measurement of tpembed in one call (one H100/H200, under 8 minutes), each part's
# output printed and written under $OUT:
#   1. throughput.txt   bench/gpu_throughput.py: padded / packed (flash-attention varlen when
#                       installed) x plain / GradCache: real tokens/s, TFLOP/s, MFU; a profile
#   2. vs_st.txt        the same stage-1 step in sentence-transformers (MNRL in MatryoshkaLoss,
#                       then the cached MNRL against GradCache): steps/s ratios, one invocation
#   3. deepspeed.txt    ZeRO-2 and ZeRO-3 through the shipped launch files, a few stage-1 steps:
#                       first-step loss against the plain run's (bf16 tolerance)
#   4. pytest_gpu.txt   the tests marked gpu: Token Prepending and export parity in bf16 on CUDA,
#                       with the measured differences
#
#   bench/gpu_suite.sh             on the GPU machine (the device tool: OUT is set there)
#   bench/gpu_suite.sh --dry-run   here, on the CPU, at toy sizes: checks every part runs
#   PARTS="vs_st pytest_gpu" bench/gpu_suite.sh   only those parts (a rerun after a fix)
#
# Packages the GPU image lacks travel as wheels in .whl/ (bench/gpu_wheels.sh fetches them);
# tpembed itself is imported from this checkout (its folders linked as the tpembed namespace).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d -t tpembed-gpu-suite-XXXX)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TPEMBED_CACHE=${TPEMBED_CACHE:-/tmp/tpembed-cache}
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! $PY -c "import tpembed.train" 2>/dev/null; then  # the checkout's folders as the tpembed namespace
  mkdir -p /tmp/tpembed-src/tpembed
  for package in train data modeling; do ln -sfn "$PWD/$package" "/tmp/tpembed-src/tpembed/$package"; done
  export PYTHONPATH=/tmp/tpembed-src${PYTHONPATH:+:$PYTHONPATH}
fi
failed=()
PARTS=" ${PARTS:-throughput vs_st deepspeed pytest_gpu} "
part() {  # part NAME COMMAND...: run, print, keep the output; a failing part does not stop the others
  local name=$1; shift
  [[ "$PARTS" == *" $name "* ]] || return 0
  echo "=== $name: $*" | tee "$OUT/$name.txt"
  "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}
if [ $DRY -eq 1 ]; then
  part throughput $PY bench/gpu_throughput.py --dry-run
  part vs_st $PY bench/vs_sentence_transformers.py --model tiny --device cpu --steps 3
  part deepspeed $PY bench/deepspeed_check.py --dry-run
  part pytest_gpu $PY -m pytest -q -n 0 -m gpu tests/test_gpu.py -s
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  part throughput $PY bench/gpu_throughput.py --steps 10
  part vs_st bash -c "$PY bench/vs_sentence_transformers.py --model qwen3-0.6b --device cuda --steps 12 && \
    $PY bench/vs_sentence_transformers.py --model qwen3-0.6b --device cuda --steps 12 --grad-cache 8"
  part deepspeed $PY bench/deepspeed_check.py
  part pytest_gpu $PY -m pytest -q -n 0 -m gpu tests/test_gpu.py -s -p no:cacheprovider
fi
echo "outputs in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed parts: ${failed[*]}"
  exit 1
fi
