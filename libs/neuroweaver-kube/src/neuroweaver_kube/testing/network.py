"""Networking of the stand-in's pod runner: addresses, DNS through /etc/hosts, ClusterIP proxies, the API over TLS.

- Addresses: pods and Services share the host's network namespace; each gets its own loopback address in a
  ``127.<net>.0.0/16`` block chosen at random per stand-in and held with a lock file in the temp directory, so
  stand-ins of tests running side by side on one machine never share an address. Pods get ``127.<net>.<1..199>.x``,
  ClusterIP Services ``127.<net>.<200..254>.x``. A process that binds ``0.0.0.0`` would take the port on every pod
  address at once: pods must bind their own address (``status.podIP`` through the downward API), as the platform's
  manifests do.
- DNS: there is no DNS server. Every pod gets a generated ``/etc/hosts`` (bind-mounted, rewritten in place as
  readiness changes) naming each Service as ``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc`` and
  ``<svc>.<ns>.svc.cluster.local`` (bare and ``<svc>.<ns>`` forms only within the pod's namespace, as the search
  path would), a headless Service with one line per ready pod, plus ``<hostname>.<subdomain>...`` pod names; and an
  ``/etc/host.conf`` with ``multi on`` so libc (and gRPC's resolvers, native and c-ares) return every address of a
  name, as cluster DNS does.
- :class:`ServiceProxy`: one TCP listener per ClusterIP Service port, forwarding each connection to a ready
  endpoint, round robin (like kube-proxy). When an endpoint refuses the connection the next one is tried, as the
  old userspace kube-proxy did; with no ready endpoint the connection is closed at once.
- :func:`serve_tls`: an optional HTTPS listener for the API with a throw-away CA, so the official client's
  in-cluster configuration (``KUBERNETES_SERVICE_HOST``/``PORT`` and the service-account ``ca.crt``) works in pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import ssl
import tempfile
import threading
from collections.abc import Iterable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any


class AddressBlock:
    """A ``127.<net>.0.0/16`` block held for this process's lifetime (an flock in the temp directory)."""

    def __init__(self) -> None:
        nets = list(range(20, 250))
        random.shuffle(nets)
        self._lock_file: IO[bytes] | None = None
        for net in nets:
            f = open(Path(tempfile.gettempdir()) / f"neuroweaver-standin-net-{net}.lock", "wb")  # noqa: SIM115
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self.net, self._lock_file = net, f
            break
        else:
            raise RuntimeError("no free 127.x.0.0/16 block for the stand-in's pods")
        self._next_pod = 0
        self._next_svc = 0
        self._free_pods: list[str] = []

    def pod_ip(self) -> str:
        # A released address is reused only when the block is used up: a pod still draining on its old address
        # must not answer the probes or the traffic meant for a new pod given that address.
        if self._next_pod >= 199 * 250 and self._free_pods:
            return self._free_pods.pop(0)
        i = self._next_pod
        self._next_pod += 1
        return f"127.{self.net}.{1 + i // 250}.{1 + i % 250}"

    def release_pod_ip(self, ip: str) -> None:
        self._free_pods.append(ip)

    def service_ip(self) -> str:
        i = self._next_svc
        self._next_svc += 1
        return f"127.{self.net}.{200 + i // 250}.{1 + i % 250}"

    def close(self) -> None:
        if self._lock_file:
            self._lock_file.close()
            self._lock_file = None


def hosts_text(own_ip: str, own_names: Iterable[str], entries: Iterable[tuple[str, str]]) -> str:
    """``/etc/hosts`` of one pod: localhost, the pod itself, then ``(ip, names)`` entries."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{own_ip}\t{' '.join(own_names)}"]
    lines += [f"{ip}\t{names}" for ip, names in entries]
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file keeping its inode: a bind mount of a single file follows the inode, not the name."""
    data = text.encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.pread(fd, len(data) + 1, 0) == data:
            return
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class ServiceProxy:
    """ClusterIP listeners: ``(ip, port)`` → the ready endpoints ``[(pod_ip, target_port)]``, on one event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="standin-proxy", daemon=True)
        self._thread.start()
        self._servers: dict[tuple[str, int], asyncio.Server] = {}
        self._endpoints: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self._next: dict[tuple[str, int], int] = {}
        self.errors: list[str] = []

    def set_listeners(self, table: dict[tuple[str, int], list[tuple[str, int]]]) -> None:
        """Open/close listeners so exactly the keys of ``table`` listen, and route to its endpoints."""
        self._endpoints = {k: list(v) for k, v in table.items()}
        for key in set(self._servers) - set(table):
            server = self._servers.pop(key)
            self._loop.call_soon_threadsafe(server.close)
        for key in set(table) - set(self._servers):
            fut = asyncio.run_coroutine_threadsafe(self._listen(key), self._loop)
            try:
                self._servers[key] = fut.result(timeout=10)
            except OSError as e:
                self.errors.append(f"cannot listen on {key[0]}:{key[1]}: {e}")

    def drop_endpoint(self, ip: str) -> None:
        """Stop routing to ``ip`` now (a pod being deleted), before its processes get SIGTERM."""
        self._endpoints = {k: [e for e in v if e[0] != ip] for k, v in self._endpoints.items()}

    async def _listen(self, key: tuple[str, int]) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._forward(key, reader, writer)

        return await asyncio.start_server(handle, key[0], key[1], reuse_address=True)

    async def _forward(self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoints = self._endpoints.get(key) or []
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        start = self._next.get(key, 0)
        self._next[key] = start + 1
        for i in range(len(endpoints)):
            host, port = endpoints[(start + i) % len(endpoints)]
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                break
            except (OSError, TimeoutError):
                continue
        if upstream is None:
            self.errors.append(f"{key[0]}:{key[1]}: no ready endpoint took the connection (tried {endpoints})")
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> int:
            sent = 0
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    sent += len(data)
                    await dst.drain()
            except (OSError, ConnectionError) as e:
                self.errors.append(f"{key[0]}:{key[1]} via {host}:{port}: {e!r} after {sent} bytes")
            finally:
                with contextlib.suppress(Exception):
                    if dst.can_write_eof():
                        dst.write_eof()
            return sent

        sent, received = await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        if sent and not received:
            self.errors.append(f"{key[0]}:{key[1]} via {host}:{port}: closed without answering")
        for w in (writer, up_writer):
            w.close()

    def close(self) -> None:
        self.set_listeners({})

        async def stop() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def serve_tls(handler_class: Any, directory: Path, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, Path]:
    """An HTTPS listener serving ``handler_class``; returns the server and the CA certificate's path."""
    # Test support only: the runtime lib's throw-away CA (`cryptography`), imported here so the kube lib's
    # production code does not depend on it.
    from neuroweaver_runtime.testing import TestCA

    ca = TestCA(directory, name="NeuroWeaver stand-in CA")
    cert, key = ca.issue("kube-apiserver", hosts=(host, "localhost", "kubernetes", "kubernetes.default.svc"))
    server = ThreadingHTTPServer((host, 0), handler_class)
    server.daemon_threads = True
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kube-standin-tls", daemon=True).start()
    return server, ca.cert
