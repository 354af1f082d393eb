"""Container health check: `grpc.health.v1.Health/Check` against the local server.

    python /usr/local/bin/nw-grpc-health <service> --port 50051 [--port-env NW_REGISTRY_PORT]
        [--tls-env-prefix NW_REGISTRY_CLIENT_ [--tls-server-name neuroweaver-registry]]
        [--server-tls-env NW_MODEL_SERVER_TLS_CERT --ops-port 9460 [--ops-port-env NW_MODEL_SERVER_METRICS_PORT]]

Exits 0 only when the server answers SERVING for <service> (the fully-qualified gRPC service name;
"" asks for the server as a whole). The port is read from the environment variable named by
--port-env when it is set there (so a port changed with NW_<SVC>_PORT is followed), else --port.
TLS: with --tls-env-prefix, the check dials like the service's own outbound calls do: TLS when
`<prefix>TLS_CA` or `<prefix>TLS_CERT` is set (the service's `--client-tls-*` settings: its CA, and
its client certificate where the server requires mTLS), plaintext otherwise. --tls-server-name is
the name to verify when the server certificate does not carry 127.0.0.1 or localhost.

The model server makes no outbound calls, so it has no client settings to borrow: its certificate names the
Service callers dial (not 127.0.0.1) and with mTLS it wants a client certificate. When the variable named by
--server-tls-env is set (the server serves TLS), the check reads `GET /healthz` on the ops port instead, over
HTTPS: 200 only once the model is loaded, the same answer as gRPC health for <service>, and that port asks no
client certificate. As the kubelet's HTTPS probe does, it does not verify the certificate: it checks its own
container over loopback and sends nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
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


def _port(default: int, env_name: str) -> str:
    """The port in `env_name` when that variable is set (a port moved with NW_<SVC>_*_PORT is followed), else `default`."""
    return (os.environ.get(env_name) if env_name else None) or str(default)


def _ops_healthz(host: str, port: str, timeout: float) -> tuple[bool, str]:
    """(SERVING?, what was seen) from `GET https://host:port/healthz`."""
    if not port.isdigit():  # -1 turns the ops port off
        return False, f"no ops port ({port!r}): a TLS server is checked there"
    context = ssl.create_default_context()
    context.check_hostname = False  # loopback self-check, like the kubelet's HTTPS probe: see the module docstring
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as err:
        return False, type(err).__name__
    finally:
        conn.close()
    try:
        status = json.loads(body).get("status", "?")
    except (ValueError, AttributeError):
        status = "?"
    return response.status == 200 and status == "SERVING", f"HTTP {response.status} {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nw-grpc-health")
    parser.add_argument("service")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-env", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--host-env",
        default="",
        help="variable holding the address the server binds (e.g. NW_REGISTRY_HOST = the pod IP); dialled instead of "
        "--host when set to a specific address (not 0.0.0.0 or ::)",
    )
    parser.add_argument("--timeout", type=float, default=4.0)
    parser.add_argument(
        "--tls-env-prefix", default="", help="e.g. NW_REGISTRY_CLIENT_: TLS settings from <prefix>TLS_CA/_CERT/_KEY"
    )
    parser.add_argument("--tls-server-name", default="", help="name to verify in the server certificate")
    parser.add_argument(
        "--server-tls-env", default="", help="e.g. NW_MODEL_SERVER_TLS_CERT: when set, check /healthz on the ops port over HTTPS"
    )
    parser.add_argument("--ops-port", type=int, default=0, help="ops port (/healthz) for --server-tls-env")
    parser.add_argument("--ops-port-env", default="", help="variable that overrides --ops-port when set")
    args = parser.parse_args(argv)
    bound = os.environ.get(args.host_env, "") if args.host_env else ""
    if bound not in ("", "0.0.0.0", "::", "[::]"):
        args.host = bound  # a server bound to one address (the pod IP) does not answer on loopback
    if args.server_tls_env and os.environ.get(args.server_tls_env):
        if not args.ops_port:
            parser.error("--server-tls-env needs --ops-port")
        ops_port = _port(args.ops_port, args.ops_port_env)
        serving, seen = _ops_healthz(args.host, ops_port, args.timeout)
        print(f"{args.host}:{ops_port} /healthz: {seen}", file=sys.stdout if serving else sys.stderr)
        return 0 if serving else 1
    target = f"{args.host}:{_port(args.port, args.port_env)}"
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
