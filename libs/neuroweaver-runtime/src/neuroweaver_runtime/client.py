"""Typed gRPC clients with deadlines, retries, auth and trace propagation.

    channel = open_channel("127.0.0.1:50051", token="...")
    registry = RegistryServiceStub(channel)

Every call gets a default deadline unless it sets its own; UNAVAILABLE is retried with exponential
backoff by gRPC's retry policy (only safe because writes carry request_id / etag).
"""

from __future__ import annotations

import json

import grpc

from .telemetry import inject_metadata

DEFAULT_DEADLINE_SECONDS = 30.0

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class _ClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
):
    def __init__(self, token: str | None, deadline: float | None) -> None:
        self._token = token
        self._deadline = deadline

    def _details(self, details: grpc.aio.ClientCallDetails, streaming_response: bool) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or [])
        if self._token and not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._token}"))
        metadata = inject_metadata(metadata)
        timeout = details.timeout
        if timeout is None and not streaming_response:  # watch streams are long-lived by design
            timeout = self._deadline
        return grpc.aio.ClientCallDetails(details.method, timeout, metadata, details.credentials, details.wait_for_ready)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, False), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, True), request)

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details, False), request_iterator)


def open_channel(
    target: str,
    *,
    token: str | None = None,
    deadline: float | None = DEFAULT_DEADLINE_SECONDS,
    tls_ca: bytes | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> grpc.aio.Channel:
    options = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    interceptors = [_ClientInterceptor(token, deadline)]
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert)
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
