"""Container health check: `grpc.health.v1.Health/Check` against the local server.

    python /usr/local/bin/nw-grpc-health <service> --port 50051 [--port-env NW_REGISTRY_PORT]
        [--tls-env-prefix NW_REGISTRY_CLIENT_ [--tls-server-name neuroweaver-registry]]

Exits 0 only when the server answers SERVING for <service> (the fully-qualified gRPC service name;
"" asks for the server as a whole). The port is read from the environment variable named by
--port-env when it is set there (so a port changed with NW_<SVC>_PORT is followed), else --port.
TLS: with --tls-env-prefix, the check dials like the service's own outbound calls do: TLS when
`<prefix>TLS_CA` or `<prefix>TLS_CERT` is set (the service's `--client-tls-*` settings: its CA, and
its client certificate where the server requires mTLS), plaintext otherwise. --tls-server-name is
the name to verify when the server certificate does not carry 127.0.0.1 or localhost.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(target: str, tls_env_prefix: str, server_name: str) -> grpc.Channel:
    if tls_env_prefix:
        from neuroweaver_runtime.client import ClientTLS

        tls = ClientTLS.from_env(tls_env_prefix, server_name=server_name or None)
        if tls.enabled:
            return grpc.secure_channel(target, tls.credentials(), options=tls.channel_options())
    return grpc.insecure_channel(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nw-grpc-health")
    parser.add_argument("service")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-env", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=4.0)
    parser.add_argument(
        "--tls-env-prefix", default="", help="e.g. NW_REGISTRY_CLIENT_: TLS settings from <prefix>TLS_CA/_CERT/_KEY"
    )
    parser.add_argument("--tls-server-name", default="", help="name to verify in the server certificate")
    args = parser.parse_args(argv)
    port = os.environ.get(args.port_env) if args.port_env else None
    target = f"{args.host}:{port or args.port}"
    try:
        channel = _channel(target, args.tls_env_prefix, args.tls_server_name)
    except ValueError as err:  # unreadable or incomplete TLS settings
        print(f"{target} {args.service or '<server>'}: {err}", file=sys.stderr)
        return 1
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"{target} {args.service or '<server>'}: {err.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target} {args.service or '<server>'}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
