#!/usr/bin/env bash
# GPU training bench: QLoRA SFT of a Llama-3-8B shape (random weights) at sequence 1k/2k/4k — our run_sft with Liger
# kernels + offloaded gradient checkpointing vs plain TRL SFTTrainer + PEFT (see bench/train/bench_gpu.py).
#   bench/train/gpu.sh [--tiny] [--out DIR] [--configs hf,ours[,ours-plain]] [--seqs 1024,2048,4096] [--cap-gb 8]
#                      [--warmup 2 --steps 5] [--check-only]
# Needs no `make install`: our packages come from libs/*/src and services/*/src; wheels carried in .whl/ (device
# tool) are installed into /tmp/nw-site first. Python: $PYTHON, else /opt/torch/.venv (GPU machine), else .venv.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in /opt/torch/.venv/bin/python3 "$ROOT/.venv/bin/python" "$(command -v python3 || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then PY=$c; break; fi
  done
fi
echo "python: $PY"
# the carried wheels are for the GPU machine's Python 3.12 (bench/train/wheels.sh); the repo's .venv has everything
if compgen -G "$ROOT/.whl/*.whl" >/dev/null && [ "$PY" != "$ROOT/.venv/bin/python" ] \
  && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nw-site "$ROOT"/.whl/*.whl
  PYTHONPATH=/tmp/nw-site${PYTHONPATH:+:$PYTHONPATH}
fi
for d in "$ROOT"/libs/*/src "$ROOT"/services/*/src; do PYTHONPATH=$d${PYTHONPATH:+:$PYTHONPATH}; done
export PYTHONPATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PY" "$ROOT/bench/train/bench_gpu.py" "$@"
