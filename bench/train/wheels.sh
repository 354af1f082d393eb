#!/usr/bin/env bash
# Fetches, into .whl/ (ignored through .git/info/exclude), the wheels bench/train/gpu.sh needs on the GPU machine
# (no registry there) beyond what its image holds (KINDS.md: torch, transformers, accelerate, huggingface-hub...):
# trl, datasets (+ dill, multiprocess), bitsandbytes, liger-kernel, peft — versions from constraints.txt where
# pinned. bitsandbytes ships one library per CUDA/ROCm version (43 MB): it is repacked with only the CUDA 13.0 one
# (the image's torch is cu130) to stay inside the device tool's 64 MiB per call. transformers is NOT carried: 5.25
# needs huggingface-hub>=2.4 and kernels, which the image's hub 1.33 stack lacks; the image's 5.17 is used.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
mkdir -p .git/info && touch .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >>.git/info/exclude
pin() { grep -i "^$1==" constraints.txt || echo "$1"; }
PY=${PYTHON:-$ROOT/.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "$(pin trl)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)" "$(pin bitsandbytes)" "$(pin peft)" \
  "$(pin liger-kernel)"
for w in .whl/bitsandbytes-*.whl; do
  if unzip -l "$w" | grep -q libbitsandbytes_cuda128; then
    tmp=$(mktemp -d)
    unzip -q "$w" -d "$tmp"
    find "$tmp/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' ! -name 'libbitsandbytes_cpu.so' -delete
    rec=$(ls "$tmp"/bitsandbytes-*.dist-info/RECORD)
    grep -v -E 'libbitsandbytes_(cuda(1[0-2][0-9]|13[1-9])|rocm)' "$rec" >"$rec.new" && mv "$rec.new" "$rec"
    rm "$w" && (cd "$tmp" && zip -q -r "$ROOT/$w" .) && rm -rf "$tmp"
  fi
done
ls -la .whl && du -sh .whl
