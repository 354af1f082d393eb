"""A small OpenAI-compatible judge server (aiohttp) for tests and benchmarks.

It speaks the OpenAI wire format (``POST /v1/chat/completions``, ``GET /v1/models``) and answers
judge prompts rendered from the default templates deterministically: the candidate's word-overlap
F1 with the reference answer mapped onto the scale (``Score: N``), or for pairwise prompts the
answer with the higher F1 (``Winner: A|B|tie``). It records every request (monotonic timestamp,
content) and supports fault injection: a queue of one-shot faults (``{"status": 429,
"retry_after": 0.2}``, ``{"status": 500}``, ``{"malformed": true}``, ``{"delay": 2.0}``) and
``malformed_if_contains`` (a substring that makes every matching request get a malformed answer).

``python -m neuroweaver_ml.rlaif.judge_server --port 8011 [--latency 0.05]`` runs it standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

_WORD = re.compile(r"[a-z0-9]+")


def _section(text: str, header: str) -> str | None:
    m = re.search(re.escape(header) + r"\n(.*?)(?:\n\n(?:[A-Z][A-Za-z ]+:\n|Grade |Which )|\Z)", text, re.S)
    return m.group(1) if m else None


def overlap_f1(candidate: str, reference: str) -> float:
    c, r = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not c or not r:
        return 0.0
    rc: dict[str, int] = {}
    for w in r:
        rc[w] = rc.get(w, 0) + 1
    common = 0
    for w in c:
        if rc.get(w, 0) > 0:
            rc[w] -= 1
            common += 1
    if common == 0:
        return 0.0
    p, q = common / len(c), common / len(r)
    return 2 * p * q / (p + q)


def judge_text(content: str, score_min: int = 1, score_max: int = 10) -> str:
    """The deterministic judge answer for a rendered judge prompt."""
    m = re.search(r"scale from (-?\d+) to (-?\d+)", content)
    if m:
        score_min, score_max = int(m.group(1)), int(m.group(2))
    ref = _section(content, "Reference answer:") or ""
    a, b = _section(content, "Answer A:"), _section(content, "Answer B:")
    if a is not None and b is not None:
        fa, fb = overlap_f1(a, ref), overlap_f1(b, ref)
        w = "A" if fa > fb else "B" if fb > fa else "tie"
        return f"Answer A overlaps the reference with F1 {fa:.2f}, answer B with {fb:.2f}.\nWinner: {w}"
    cand = _section(content, "Candidate answer:") or ""
    f1 = overlap_f1(cand, ref)
    score = score_min + round((score_max - score_min) * f1)
    return f"The candidate shares {f1:.0%} of its words with the reference.\nScore: {score}"


@dataclass
class RecordedRequest:
    t: float  # time.monotonic() at arrival
    content: str
    status: int = 200


@dataclass
class JudgeServerState:
    faults: list[dict[str, Any]] = field(default_factory=list)
    malformed_if_contains: str | None = None
    latency_s: float = 0.0
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def contents(self, status: int | None = 200) -> list[str]:
        with self.lock:
            return [r.content for r in self.requests if status is None or r.status == status]


def make_app(state: JudgeServerState):
    from aiohttp import web

    async def models(_request):
        return web.json_response({"object": "list", "data": [{"id": "nw-judge", "object": "model", "owned_by": "nw"}]})

    async def chat(request):
        body = await request.json()
        msgs = body.get("messages") or []
        content = "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
        rec = RecordedRequest(t=time.monotonic(), content=content)
        with state.lock:
            state.requests.append(rec)
            fault = state.faults.pop(0) if state.faults else None
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        if fault and fault.get("delay"):
            await asyncio.sleep(float(fault["delay"]))
        if fault and fault.get("status"):
            rec.status = int(fault["status"])
            headers = {}
            if fault.get("retry_after") is not None:
                headers["Retry-After"] = str(fault["retry_after"])
            return web.json_response(
                {"error": {"message": f"injected {rec.status}", "type": "injected", "code": rec.status}},
                status=rec.status,
                headers=headers,
            )
        if (fault and fault.get("malformed")) or (state.malformed_if_contains and state.malformed_if_contains in content):
            text = "I would rather not put a number on this answer."
        else:
            text = judge_text(content)
        pt, ct = len(content.split()), len(text.split())
        return web.json_response(
            {
                "id": f"chatcmpl-{len(state.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "nw-judge"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            }
        )

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


class JudgeServer:
    """Runs the app on 127.0.0.1 in a background thread: ``with JudgeServer() as s: s.base_url``."""

    def __init__(self, port: int = 0, state: JudgeServerState | None = None):
        self.state = state or JudgeServerState()
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> JudgeServer:
        from aiohttp import web

        async def _start():
            self._runner = web.AppRunner(make_app(self.state), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()

        def _run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(_start())
            self._loop.run_forever()

        self._thread = threading.Thread(target=_run, name="judge-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("judge server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        assert self._runner is not None  # set on the loop before start() returns
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    args = ap.parse_args(argv)
    from aiohttp import web

    web.run_app(make_app(JudgeServerState(latency_s=args.latency)), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
