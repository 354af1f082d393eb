"""The model server's `code` label names gRPC outcomes as go-grpc-prometheus does, which the alert regex matches."""

from __future__ import annotations

import asyncio
import re
import time

from neuroweaver_kube.metrics import SERVER_ERROR_CODES_REGEX
from neuroweaver_model_server.api.servicer import _code_of
from neuroweaver_runtime.errors import NotFound, ResourceExhausted


def test_failed_calls_are_labelled_with_go_code_names():
    code = _code_of(None)
    assert code(NotFound("no such model", reason="MODEL_NOT_FOUND")) == "NotFound"
    assert code(ResourceExhausted("queue full", reason="QUEUE_FULL")) == "ResourceExhausted"
    assert code(asyncio.CancelledError()) == "Canceled"
    assert code(RuntimeError("boom")) == "Internal"
    assert _code_of(time.monotonic() - 1)(asyncio.CancelledError()) == "DeadlineExceeded"


def test_the_alert_regex_counts_server_errors_only():
    server_error = re.compile(f"^(?:{SERVER_ERROR_CODES_REGEX})$")
    for label in ("Internal", "Unknown", "Unavailable", "DeadlineExceeded", "DataLoss", "ResourceExhausted", "503"):
        assert server_error.match(label), label
    for label in ("OK", "NotFound", "InvalidArgument", "Canceled", "200", "400", "INTERNAL"):
        assert not server_error.match(label), label
