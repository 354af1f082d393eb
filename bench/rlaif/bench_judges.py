"""Judge throughput: scored answers/s of the OpenAI-compatible judge at concurrency 1/4/8 against the
neuroweaver_ml.rlaif.judge_server (a real aiohttp HTTP server; --latency adds a fixed per-answer delay standing in
for a remote LLM's generation time) and of the local MiniLM embedding judge (batched).

    .venv/bin/python bench/rlaif/bench_judges.py [--n 64] [--latency 0.1]
"""

import argparse
import asyncio
import json
import time

from neuroweaver_ml.rlaif.judge_server import JudgeServer, JudgeServerState
from neuroweaver_ml.rlaif.judges import JudgeConfig, LocalEmbeddingJudge, OpenAICompatibleJudge


def items(n, tag):
    return [(f"{tag} question {i}: when should brake pads be replaced?",
             f"Replace them when the lining is under {i % 5 + 1} millimetres.",
             "Replace brake pads when the lining is under three millimetres.") for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.1)
    a = ap.parse_args()
    out = {"n": a.n, "latency_s": a.latency, "openai_compatible": {}, "local_embedding": {}}
    with JudgeServer(state=JudgeServerState(latency_s=a.latency)) as s:
        for c in (1, 4, 8):
            j = OpenAICompatibleJudge(JudgeConfig(name=f"bench/{c}", kind="openai_compatible", base_url=s.base_url,
                                                  model="nw-judge", max_concurrency=c))

            async def go(j=j, c=c):
                await j.score_many(items(2, f"warm{c}"))
                t = time.perf_counter()
                res = await j.score_many(items(a.n, f"c{c}"))
                dt = time.perf_counter() - t
                await j.aclose()
                return dt, sum(r.ok for r in res)

            dt, ok = asyncio.run(go())
            out["openai_compatible"][c] = {"answers_per_s": round(a.n / dt, 2), "ok": ok, "seconds": round(dt, 2)}
    lj = LocalEmbeddingJudge(JudgeConfig(name="bench/local", kind="local_embedding"))
    asyncio.run(lj.score_many(items(4, "warm")))
    for bs in (1, 32):
        lj.config.batch_size = bs
        t = time.perf_counter()
        res = asyncio.run(lj.score_many(items(a.n, f"b{bs}")))
        dt = time.perf_counter() - t
        out["local_embedding"][f"batch_{bs}"] = {"answers_per_s": round(a.n / dt, 2), "ok": sum(r.ok for r in res)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
