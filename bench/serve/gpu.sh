#!/usr/bin/env bash
# GPU serving bench: the vLLM engine vs raw vLLM (`vllm serve` with --enable-lora) vs the transformers engine,
# Llama-3-8B shape (random weights) + 2 LoRA adapters, concurrency 1/8/32 (see bench/serve/bench_gpu.py).
#   bench/serve/gpu.sh [--smoke] [--out DIR] [--systems ...] [--concurrency 1,8,32] [--max-tokens N] [--check-only]
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
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nw-site "$ROOT"/.whl/*.whl
  PYTHONPATH=/tmp/nw-site${PYTHONPATH:+:$PYTHONPATH}
fi
for d in "$ROOT"/libs/*/src "$ROOT"/services/*/src; do PYTHONPATH=$d${PYTHONPATH:+:$PYTHONPATH}; done
export PYTHONPATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/bench/serve/bench_gpu.py" "$@"
