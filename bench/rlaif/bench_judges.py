"""Judge throughput: scored answers/s of the OpenAI-compatible judge at concurrency 1/4/8

* against the project's own model server (`python -m neuroweaver_model_server`, a real OpenAI-compatible
  endpoint) serving SmolLM2-135M-Instruct on this machine's CPU: real generation, the real judge prompt (`--model-server`);
* against neuroweaver_ml.rlaif.judge_server (a real aiohttp HTTP server that answers at once after `--latency`
  seconds, standing in for a remote LLM: it isolates the client's own overhead);

and of the local MiniLM embedding judge (batched).

    .venv/bin/python bench/rlaif/bench_judges.py [--n 64] [--latency 0.1] [--model-server] [--ms-n 24] [--ms-max-tokens 12]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

from neuroweaver_ml.rlaif.judge_server import JudgeServer, JudgeServerState
from neuroweaver_ml.rlaif.judges import JudgeConfig, LocalEmbeddingJudge, OpenAICompatibleJudge
from neuroweaver_runtime.testing import free_port


def items(n, tag):
    return [
        (
            f"{tag} question {i}: when should brake pads be replaced?",
            f"Replace them when the lining is under {i % 5 + 1} millimetres.",
            "Replace brake pads when the lining is under three millimetres.",
        )
        for i in range(n)
    ]


def openai_throughput(base_url, model, n, concurrencies, max_tokens=None):
    rows = {}
    for c in concurrencies:
        extra = {"max_tokens": max_tokens} if max_tokens else {}
        j = OpenAICompatibleJudge(
            JudgeConfig(
                name=f"bench/{c}",
                kind="openai_compatible",
                base_url=base_url,
                model=model,
                max_concurrency=c,
                timeout_seconds=600,
                **extra,
            )
        )

        async def go(j=j, c=c):
            await j.score_many(items(2, f"warm{c}"))
            t = time.perf_counter()
            res = await j.score_many(items(n, f"c{c}"))
            dt = time.perf_counter() - t
            await j.aclose()
            return dt, res

        dt, res = asyncio.run(go())
        rows[c] = {
            "answers_per_s": round(n / dt, 2),
            "scored": sum(r.ok for r in res),
            "malformed": sum(bool(r.malformed) for r in res),
            "completion_tokens": sum(r.completion_tokens for r in res),
            "seconds": round(dt, 2),
        }
    return rows


def start_model_server(threads):
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "neuroweaver_model_server",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--base-model",
            "builtin:smollm2-135m-instruct",
            "--served-model-name",
            "smollm2-judge",
            "--max-batch-size",
            "8",
        ],
        env=env,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{http_port}/v1"
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"model server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("model server did not become healthy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument(
        "--model-server", action="store_true", help="also measure against a local model server with SmolLM2-135M-Instruct"
    )
    ap.add_argument("--ms-n", type=int, default=24, help="answers judged per concurrency against the model server")
    ap.add_argument("--ms-max-tokens", type=int, default=12, help="max_tokens of each verdict from the model server")
    ap.add_argument("--ms-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the model server")
    a = ap.parse_args()
    out = {"n": a.n, "latency_s": a.latency, "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"}
    if a.model_server:
        proc, base_url = start_model_server(a.ms_threads)
        try:
            out["model_server_smollm2"] = {
                "n": a.ms_n,
                "max_tokens": a.ms_max_tokens,
                "by_concurrency": openai_throughput(base_url, "smollm2-judge", a.ms_n, (1, 4, 8), a.ms_max_tokens),
            }
        finally:
            proc.terminate()
            proc.wait(60)
    with JudgeServer(state=JudgeServerState(latency_s=a.latency)) as s:
        out["openai_compatible_fixed_latency"] = openai_throughput(s.base_url, "nw-judge", a.n, (1, 4, 8))
    lj = LocalEmbeddingJudge(JudgeConfig(name="bench/local", kind="local_embedding"))
    asyncio.run(lj.score_many(items(4, "warm")))
    out["local_embedding"] = {}
    for bs in (1, 32):
        lj.config.batch_size = bs
        t = time.perf_counter()
        res = asyncio.run(lj.score_many(items(a.n, f"b{bs}")))
        dt = time.perf_counter() - t
        out["local_embedding"][f"batch_{bs}"] = {"answers_per_s": round(a.n / dt, 2), "scored": sum(r.ok for r in res)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
