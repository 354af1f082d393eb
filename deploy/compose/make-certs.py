"""A throw-away CA and certificates for mTLS on one Docker host (deploy/compose/mtls.yml).

    .venv/bin/python deploy/compose/make-certs.py [--out deploy/compose/tls] [--days 365]

Writes ca.pem; <service>.pem and <service>-key.pem for registry, trainer, deployer and experiments (server
and client use; SANs: the compose service name, which the others dial, plus localhost and 127.0.0.1, which
the health checks dial); console.pem and console-key.pem (client use only: the web console's calls to the
services); client.pem and client-key.pem for `nw` and RelayCore on the host. Not for production: use your own
CA there (cert-manager on Kubernetes, see deploy/README.md).

The containers run as uid 10001 and read the keys through a bind mount, so the keys are written readable
by all (0644), like auth-tokens.json; on a shared host chown them to 10001 and chmod 0600 instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuroweaver_runtime.testing import TestCA

SERVICES = ("registry", "trainer", "deployer", "experiments")


def make_certs(out: Path, days: int = 365) -> list[Path]:
    ca = TestCA(out, name="NeuroWeaver compose CA", days=days)
    written = [ca.cert]
    for svc in SERVICES:
        written += ca.issue(svc, hosts=(svc, "localhost", "127.0.0.1"))
    written += ca.issue("console", hosts=(), server=False)  # only calls the services (its pages: plain HTTP)
    written += ca.issue("client", hosts=(), server=False)
    for path in written:
        path.chmod(0o644)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make-certs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tls")
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    for path in make_certs(args.out, args.days):
        print(path)


if __name__ == "__main__":
    main()
