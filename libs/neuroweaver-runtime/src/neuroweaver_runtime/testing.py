"""Test helpers shared by every service: fresh PostgreSQL databases, free ports and a throw-away CA.

PostgreSQL tests use `NW_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/postgres`)
as an admin connection and create one throw-away database per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import DomainError, InvalidArgument
from .ports import free_port as free_port  # re-exported: tests import it from here

ADMIN_URL = os.environ.get("NW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def create_postgres_database(prefix: str = "nwtest") -> tuple[str, Callable]:
    """Creates an empty database; returns (sqlalchemy async URL, async drop function)."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = ADMIN_URL.rsplit("/", 1)[0]
    url = base.replace("postgresql://", "postgresql+asyncpg://", 1) + "/" + name

    async def drop() -> None:
        conn2 = await asyncpg.connect(ADMIN_URL)
        try:
            await conn2.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn2.close()

    return url, drop


def postgres_available() -> bool:
    async def probe() -> bool:
        import asyncpg

        try:
            conn = await asyncio.wait_for(asyncpg.connect(ADMIN_URL), 5)
        except Exception:  # noqa: BLE001
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


class TestCA:
    """A throw-away certificate authority for TLS/mTLS tests and dev setups (the `cryptography` package; EC P-256
    keys; valid for `days`, one by default).

        ca = TestCA(tmp_path / "pki")
        cert, key = ca.issue("registry")          # SANs 127.0.0.1 and localhost; server and client use
        ClientTLS(ca=str(ca.cert), cert=str(cert), key=str(key))

    PEM files go to `directory`: `<name>.pem` and `<name>-key.pem`, the CA's certificate at `ca.cert`.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "NeuroWeaver test CA", days: int = 1) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.days = days
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )  # fmt: skip
        self.cert = self._write("ca.pem", cert)

    def issue(
        self, name: str, *, hosts: Sequence[str] = ("127.0.0.1", "localhost"), server: bool = True, client: bool = True
    ) -> tuple[Path, Path]:
        """A leaf certificate for `name` (its CN) with `hosts` as DNS/IP SANs; returns (certificate, key) paths."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_path = self.directory / f"{name}-key.pem"
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        key_path.chmod(0o600)
        return self._write(f"{name}.pem", cert), key_path

    def _write(self, filename: str, cert) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.directory / filename
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


class Duplicate(Exception):
    """An in-memory fake's unique-constraint violation."""


class FakeUnitOfWorkBase:
    """The in-memory twin of `unit_of_work.SqlUnitOfWorkBase` for use-case tests: idempotency keys in `requests`
    (request_id → (method, fingerprint, resource)) and `Duplicate` mapped like an integrity error."""

    def __init__(self, requests: dict[str, tuple[str, str, str]]) -> None:
        self._requests = requests

    async def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        earlier = self._requests.get(request_id) if request_id else None
        if earlier is None:
            return None
        if earlier[:2] != (method, fingerprint):
            raise InvalidArgument(
                "request_id was already used for a different request", field="request_id", reason="REQUEST_ID_REUSED"
            )
        return earlier[2]

    async def remember_request(self, request_id: str, method: str, fingerprint: str, resource: str) -> None:
        if request_id:
            self._requests[request_id] = (method, fingerprint, resource)

    @contextlib.contextmanager
    def duplicate(self, error: DomainError) -> Iterator[None]:
        try:
            yield
        except Duplicate:
            raise error from None


@contextlib.contextmanager
def serving_process(module: str, *args: str, timeout: float = 60.0) -> Iterator[str]:
    """`python -m module --port P --metrics-port -1 *args` started and waited for until its gRPC health says SERVING;
    yields its target (`127.0.0.1:P`) and terminates it afterwards."""
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), "--metrics-port", "-1", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert proc.poll() is None, f"{module} exited"
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"{module} did not become SERVING"
                time.sleep(0.05)  # polling interval while waiting for the process
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
