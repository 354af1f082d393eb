"""SIGTERM during traffic: a registry process with open WatchModelEvents streams, a health Watch and a burst of unary
calls in flight. Health must turn NOT_SERVING (seen on the Watch stream) before the server goes away, the unary calls
must finish OK (or, if they had not reached the server yet, be refused as UNAVAILABLE — never cut off with another
code), and the process must exit 0 within the grace period."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nwstack import start_service, wait_for

from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rg
from neuroweaver_runtime.grpc_errors import error_info

GRACE_S = 8.0
SERVICE = "neuroweaver.registry.v1.RegistryService"


def test_sigterm_drains_in_flight_calls_and_exits_zero(tmp_path):
    registry = start_service("registry", tmp_path, "--shutdown-grace-seconds", str(GRACE_S))
    try:
        registry.wait_serving()
        channel = grpc.insecure_channel(registry.target)
        stub = rg.RegistryServiceStub(channel)
        health_seen: list[int] = []
        health_ended = threading.Event()

        def watch_health():
            try:
                for resp in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60):
                    health_seen.append(resp.status)
            except grpc.RpcError:
                pass
            health_ended.set()

        threading.Thread(target=watch_health, daemon=True).start()
        wait_for(lambda: health_pb2.HealthCheckResponse.SERVING in health_seen, 10, "health Watch to report SERVING")

        watch_events: dict[int, list] = {i: [] for i in range(int(__import__("os").environ.get("NW_SIGTERM_WATCHES", "3")))}
        watch_codes: dict[int, grpc.StatusCode] = {}

        def watch_models(i: int):
            try:
                for ev in stub.WatchModelEvents(rs.WatchModelEventsRequest(parent="projects/default"), timeout=60):
                    watch_events[i].append(ev)
                watch_codes[i] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                watch_codes[i] = err.code()

        for i in watch_events:
            threading.Thread(target=watch_models, args=(i,), daemon=True).start()
        # The streams are established once an event written now reaches every one of them.
        stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="warmup"), timeout=10)
        wait_for(lambda: all(watch_events.values()), 15, "every WatchModelEvents stream to receive the first event")

        def unary(i: int):
            started = time.monotonic()
            try:
                stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id=f"burst-{i}"), timeout=30)
                return started, grpc.StatusCode.OK
            except grpc.RpcError as err:
                return started, err.code()

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(unary, i) for i in range(64)]
            wait_for(lambda: sum(f.running() or f.done() for f in futures) >= 16, 10, "the burst to be under way")
            registry.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            results = [f.result(timeout=GRACE_S + 20) for f in futures]
        # Calls issued before the signal were in flight: they finish OK, or were refused (never reached the server).
        # Calls issued after it may also be left pending by gRPC core until the grace ends (CANCELLED).
        codes = [code for started, code in results if started < sent]

        registry.proc.wait(timeout=GRACE_S + 15)
        took = time.monotonic() - sent
        assert registry.proc.returncode == 0, registry.log_text()[-3000:]
        assert took < GRACE_S + 10, f"exit took {took:.1f}s"
        wait_for(health_ended.is_set, 10, "the health Watch stream to end")
        assert health_pb2.HealthCheckResponse.NOT_SERVING in health_seen, health_seen
        first_not_serving = health_seen.index(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health_seen[first_not_serving - 1] == health_pb2.HealthCheckResponse.SERVING
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
            f"exit after {took:.1f}s",
            [c.name for c in codes],
            registry.log_text()[-2500:],
        )
        assert codes.count(grpc.StatusCode.OK) >= 1, codes
        wait_for(lambda: len(watch_codes) == len(watch_events), 10, "every watch stream to end")
        channel.close()
    finally:
        registry.stop()


def test_sigterm_ends_open_watches_at_once_and_exits_long_before_the_grace(tmp_path):
    """Open WatchModelEvents streams do not hold the stop: they end with UNAVAILABLE / SHUTTING_DOWN (a status their
    clients reconnect on, unlike OK, which means the stream is over) while the unary calls in flight finish OK, and
    the process exits 0 long before its 60 s grace period."""
    grace = 60.0
    # The default drain (1 s) serves what arrives meanwhile; calls reaching a server that stopped accepting are
    # dropped by gRPC core as CANCELLED, which the drain exists to avoid.
    registry = start_service("registry", tmp_path, "--shutdown-grace-seconds", str(grace))
    try:
        registry.wait_serving()
        channel = grpc.insecure_channel(registry.target)
        stub = rg.RegistryServiceStub(channel)
        events: dict[int, list] = {0: [], 1: []}
        ended: dict[int, grpc.RpcError | None] = {}

        def watch_models(i: int):
            try:
                for ev in stub.WatchModelEvents(rs.WatchModelEventsRequest(parent="projects/default"), timeout=120):
                    events[i].append(ev)
                ended[i] = None
            except grpc.RpcError as err:
                ended[i] = err

        for i in events:
            threading.Thread(target=watch_models, args=(i,), daemon=True).start()
        stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="warmup"), timeout=10)
        wait_for(lambda: all(events.values()), 15, "every WatchModelEvents stream to receive the first event")

        def unary(i: int):
            started = time.monotonic()
            try:
                stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id=f"burst-{i}"), timeout=60)
                return started, grpc.StatusCode.OK
            except grpc.RpcError as err:
                return started, err.code()

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(unary, i) for i in range(32)]
            wait_for(lambda: sum(f.running() or f.done() for f in futures) >= 8, 10, "the burst to be under way")
            registry.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            results = [f.result(timeout=grace) for f in futures]
        registry.proc.wait(timeout=grace)
        took = time.monotonic() - sent
        assert registry.proc.returncode == 0, registry.log_text()[-3000:]
        assert took < grace / 2, f"exit took {took:.1f}s: something held the stop for the grace period"

        wait_for(lambda: len(ended) == len(events), 10, "every watch stream to end")
        for err in ended.values():
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "shutting down" in err.details()
            info = error_info(err)
            assert info is not None and info.reason == "SHUTTING_DOWN", info
        codes = [code for started, code in results if started < sent]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, [c.name for c in codes]
        assert codes.count(grpc.StatusCode.OK) >= 1, codes  # calls in flight at SIGTERM finished
        channel.close()
    finally:
        registry.stop()
