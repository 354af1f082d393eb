"""Fuzz every unary RPC of every service with random and mutated requests built from the message descriptors.

Bad input must come back as a canonical client error (INVALID_ARGUMENT, NOT_FOUND, ...) — never UNKNOWN or
INTERNAL, never a hang — and every server must still be SERVING afterwards. Real processes on SQLite, auth off.
Reproducible: the seed is printed with every failure (NW_FUZZ_SEED overrides it); NW_FUZZ_PER_RPC sets the budget.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time

import grpc
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2
from nwstack import SERVICES, call, health_status, message_class, minimal_request, service_descriptor, start_service

SEED = int(os.environ.get("NW_FUZZ_SEED", "20240611"))
PER_RPC = int(os.environ.get("NW_FUZZ_PER_RPC", "150"))
TIME_BOX_S = 100.0  # the whole run; every RPC still gets a fair share because services run in parallel
BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED)

STRINGS = [
    "",
    " ",
    "a",
    "projects",
    "projects/",
    "projects/default",
    "projects//models/x",
    "projects/../etc/passwd",
    "projects/default/models/../../other",
    "projects/default/models/m1",
    "projects/default/models/m1/versions/1.0.0",
    "projects/default/models/m1/versions/-1",
    "projects/default/models/m1/aliases/prod",
    "projects/default/judges/j1/versions/0",
    "projects/default/trainingJobs/j1",
    "projects/default/deployments/d1",
    "projects/default/experiments/e1",
    "projects/other/models/m1",
    "projects/default/models/M1",
    "projects/default/models/" + "a" * 70,
    "1.0.0",
    "v1",
    "99999999999999999999.0.0",
    "1.0.0-rc.1+build",
    "major",
    "minor",
    "patch",
    "prod",
    "*",
    "%",
    "'; DROP TABLE models; --",
    "state = STATE_ACTIVE",
    'name = "x" AND',
    "labels.team = ml",
    "create_time desc",
    "name desc, bogus",
    "create_time desc desc",
    "ünïcødé-模型-🙂",
    "\u0000",
    "\t\n",
    "file:///etc/passwd",
    "file://../../etc",
    "s3://bucket/x",
    "builtin:tiny",
    "../" * 20,
    "/",
    "\\",
    "{response}",
    "{",
    "x" * 5000,
    "😀" * 1000,
    "A" * 200_000,
    "CAESBnRhbXBlcg==",
    "eyJ0YW1wZXJlZCI6dHJ1ZX0",
    "00000000-0000-0000-0000-000000000000",
    "not-a-uuid",
    "ab" * 32,
    "ZZ" * 32,
]
INT32 = [0, 1, -1, 2, 7, 100, 1000, 1001, 2**31 - 1, -(2**31), 50, -50]
INT64 = INT32 + [2**63 - 1, -(2**63), 2**40]
UINT32 = [0, 1, 2**32 - 1, 1000]
UINT64 = UINT32 + [2**64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e308, -1e308, 1e-308, math.inf, -math.inf, math.nan, 2.0, 100.0]


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def string(self, field) -> str:
        r = self.rng
        pick = r.random()
        if pick < 0.7:
            return r.choice(STRINGS)
        if pick < 0.85:
            return "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789-_/.:ÄΩ") for _ in range(r.randint(0, 40)))
        return r.choice(STRINGS) + r.choice(["", "/", "/versions/", "/x"]) + r.choice(STRINGS)[:50]

    def scalar(self, field):
        r = self.rng
        t = field.type
        if t == field.TYPE_STRING:
            return self.string(field)
        if t == field.TYPE_BYTES:
            return r.randbytes(r.choice([0, 1, 16, 1000]))
        if t == field.TYPE_BOOL:
            return r.random() < 0.5
        if t in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
            v = r.choice(FLOATS)
            return v if t == field.TYPE_DOUBLE or not math.isfinite(v) or abs(v) < 3e38 else 3e38
        if t == field.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return r.choice(values + [len(values), 99, -1, 2**31 - 1])  # unknown values too (open enums)
        if t in (field.TYPE_INT32, field.TYPE_SINT32, field.TYPE_SFIXED32):
            return r.choice(INT32)
        if t in (field.TYPE_INT64, field.TYPE_SINT64, field.TYPE_SFIXED64):
            return r.choice(INT64)
        if t in (field.TYPE_UINT32, field.TYPE_FIXED32):
            return r.choice(UINT32)
        if t in (field.TYPE_UINT64, field.TYPE_FIXED64):
            return r.choice(UINT64)
        raise AssertionError(f"unhandled field type {t}")

    def fill(self, msg, depth: int = 0, density: float = 0.6) -> None:
        r = self.rng
        for field in msg.DESCRIPTOR.fields:
            if r.random() > density:
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                target = getattr(msg, field.name)
                key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                for _ in range(r.choice([0, 1, 2, 3, 40])):
                    key = self.scalar(key_f)
                    if val_f.message_type is not None:
                        if depth < 3:
                            self.fill(target[key], depth + 1, density)
                    else:
                        target[key] = self.scalar(val_f)
            elif field.message_type is not None:
                if depth >= 3:
                    continue
                if field.is_repeated:
                    for _ in range(r.choice([0, 1, 2, 5])):
                        self.fill(getattr(msg, field.name).add(), depth + 1, density)
                else:
                    sub = getattr(msg, field.name)
                    sub.SetInParent()
                    self.fill(sub, depth + 1, density)
            elif field.is_repeated:
                getattr(msg, field.name).extend(self.scalar(field) for _ in range(r.choice([0, 1, 2, 5, 200])))
            else:
                setattr(msg, field.name, self.scalar(field))

    def request(self, svc: str, method):
        """Half fully random, half a plausible request (names in `default`) with a few fields mutated."""
        cls = message_class(method.input_type)
        if self.rng.random() < 0.5:
            msg = cls()
            self.fill(msg, density=self.rng.choice([0.2, 0.6, 1.0]))
            return msg
        msg = minimal_request(svc, method)
        mutant = cls()
        self.fill(mutant, density=0.3)
        msg.MergeFrom(mutant)  # overlays a few random fields on the plausible request
        return msg


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    registry = start_service("registry", work)
    procs = {"registry": registry}
    procs["deployer"] = start_service("deployer", work, "--registry-target", registry.target)
    procs["trainer"] = start_service("trainer", work, "--no-run-jobs", "--registry-target", registry.target)
    procs["experiments"] = start_service(
        "experiments", work, "--registry-target", registry.target, "--deployer-target", procs["deployer"].target
    )
    try:
        for p in procs.values():
            p.wait_serving()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def _fuzz_service(svc: str, target: str, deadline: float, failures: list, counts: dict) -> None:
    methods = [m for m in service_descriptor(svc).methods if not m.client_streaming and not m.server_streaming]
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
        # round-robin so that a time box cut short still covers every RPC evenly
        for i in range(PER_RPC):
            for method in methods:
                if time.monotonic() > deadline:
                    return
                rng = random.Random(f"{SEED}:{svc}:{method.name}:{i}")
                request = Gen(rng).request(svc, method)
                code, err = call(ch, svc, method, request, timeout=15.0)
                counts[f"{svc}.{method.name}"] = counts.get(f"{svc}.{method.name}", 0) + 1
                if code in BAD:
                    text = text_format.MessageToString(request, as_utf8=True)
                    failures.append(f"{svc}.{method.name} #{i} (seed {SEED}) → {code.name}: {err.details()}\n  {text[:600]}")


def test_fuzz_every_unary_rpc(services):
    deadline = time.monotonic() + TIME_BOX_S
    failures: list[str] = []
    counts: dict[str, int] = {}
    threads = [
        threading.Thread(target=_fuzz_service, args=(svc, p.target, deadline, failures, counts), daemon=True)
        for svc, p in services.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIME_BOX_S + 60)
    expected = {
        f"{svc}.{m.name}"
        for svc in SERVICES
        for m in service_descriptor(svc).methods
        if not m.client_streaming and not m.server_streaming
    }
    assert set(counts) == expected, f"RPCs never fuzzed: {sorted(expected - set(counts))}"
    assert min(counts.values()) >= 20, f"time box too small for a meaningful run: {counts}"
    print(f"fuzzed {sum(counts.values())} requests over {len(counts)} RPCs (min {min(counts.values())} per RPC, seed {SEED})")
    assert not failures, f"{len(failures)} requests got {', '.join(c.name for c in BAD)}:\n" + "\n".join(failures[:30])
    for svc, p in services.items():
        assert p.proc.poll() is None, f"{svc} died:\n{p.log_text()[-3000:]}"
        assert health_status(p.port, SERVICES[svc][2]) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(p.port) == health_pb2.HealthCheckResponse.SERVING
