"""Prometheus metrics of the model server. The two names the alert rules query come from
`neuroweaver_kube.metrics`, so manifests and server cannot drift apart."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from neuroweaver_kube.metrics import CODE_LABEL, INFERENCE_REQUEST_DURATION_SECONDS, INFERENCE_REQUESTS_TOTAL

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 120)

REQUEST_DURATION = Histogram(
    INFERENCE_REQUEST_DURATION_SECONDS,
    "Inference request latency from admission to the last token (seconds).",
    ["method", CODE_LABEL],
    buckets=_LATENCY_BUCKETS,
)
REQUESTS = Counter(
    INFERENCE_REQUESTS_TOTAL.removesuffix("_total"),
    "Finished inference requests by method and outcome (gRPC code name or HTTP status).",
    ["method", CODE_LABEL],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "nw_inference_time_to_first_token_seconds",
    "Time from admission to the first generated token.",
    ["method"],
    buckets=_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("nw_inference_prompt_tokens", "Prompt tokens processed.")
COMPLETION_TOKENS = Counter("nw_inference_completion_tokens", "Tokens generated.")
QUEUE_DEPTH = Gauge("nw_inference_queue_depth", "Requests waiting for the generation worker.")
INFLIGHT = Gauge("nw_inference_inflight_requests", "Requests being decoded right now.")
BATCH_SIZE = Histogram("nw_inference_batch_size", "Requests decoded together per batch.", buckets=(1, 2, 4, 8, 16, 32, 64))
MODEL_LOADED = Gauge(
    "nw_inference_model_loaded", "1 once the model is loaded and serving.", ["served_model_name", "model_version"]
)
ENGINE = Gauge("nw_inference_engine", "1 for the engine decoding this server's model.", ["engine"])
LOAD_SECONDS = Gauge("nw_inference_model_load_seconds", "Seconds the model took to load.")


@contextmanager
def observe(method: str, code_of: Callable[[BaseException], str], ok: str = "OK"):
    """Counts one request and its latency under the code `code_of` derives from how it ended."""
    started = time.perf_counter()
    code = ok
    try:
        yield
    except BaseException as exc:
        code = code_of(exc)
        raise
    finally:
        REQUEST_DURATION.labels(method, code).observe(time.perf_counter() - started)
        REQUESTS.labels(method, code).inc()
