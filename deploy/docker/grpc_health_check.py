"""Container health check: `grpc.health.v1.Health/Check` against the local server.

    python /usr/local/bin/nw-grpc-health <service> --port 50051 [--port-env NW_REGISTRY_PORT]

Exits 0 only when the server answers SERVING for <service> (the fully-qualified gRPC service name;
"" asks for the server as a whole). The port is read from the environment variable named by
--port-env when it is set there (so a port changed with NW_<SVC>_PORT is followed), else --port.
Plaintext only: with TLS on, point the orchestrator's probe at a TLS-aware checker instead.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nw-grpc-health")
    parser.add_argument("service")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-env", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    port = os.environ.get(args.port_env) if args.port_env else None
    target = f"{args.host}:{port or args.port}"
    with grpc.insecure_channel(target) as channel:
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
