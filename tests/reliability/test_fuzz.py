"""Fuzz every RPC of every service — unary, server-streaming and client-streaming — and the model server's
InferenceService, with random and mutated requests built from the message descriptors and patched on the wire.

Real processes with auth on (a `*` admin token for most cases, a viewer of one project for some), once on SQLite and
once on PostgreSQL, the message limit lowered to 1 MiB so that "near the limit" is cheap. Each RPC gets a fixed
number of cases (NW_FUZZ_PER_RPC), each case a kind in turn:

- random: every field filled at random (unknown enum values, empty and odd strings, long repeated fields);
- plausible: a request naming resources in `default`, a few fields overlaid at random;
- invalid UTF-8 in one string field at any depth (raw bytes on the wire: a marker is serialized, then replaced by
  bytes of the same length that are not UTF-8: 0xff, lone continuation bytes, overlong forms, surrogates);
- NUL characters in one string field (valid UTF-8 that no database stores);
- a string just under (or just over) the message limit; a repeated field with tens of thousands of elements;
- extreme numbers in every numeric field (±2^63, 2^64-1, NaN, ±inf, negative counts and sizes);
- random bytes; a plausible request with flipped bytes, cut short, or with unknown fields appended.

Server streams are read for a few messages, then cancelled; client streams send a few fuzzed messages. Every answer
must be a canonical status other than UNKNOWN or INTERNAL (a unary call never hangs into DEADLINE_EXCEEDED), with a
bounded message and bounded details; no server logs a traceback; every server is still SERVING at the end.
Deterministic: case `i` of an RPC is drawn from Random(f"{seed}:{service}:{method}:{i}") (NW_FUZZ_SEED); a failure
prints the seed, the case and the first bytes of its payload.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nwstack import (
    SERVICES,
    health_status,
    message_class,
    minimal_request,
    service_databases,
    service_descriptor,
    start_service,
    wait_for,
)

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver_runtime.grpc_errors import field_violations
from neuroweaver_runtime.testing import free_port

SEED = int(os.environ.get("NW_FUZZ_SEED", "20240611"))
PER_RPC = int(os.environ.get("NW_FUZZ_PER_RPC", "27"))
LIMIT = 1024 * 1024  # --max-message-bytes of every server under test
MAX_MESSAGE_CHARS = 1024  # an error message echoes no unbounded input
MAX_DETAILS_BYTES = 8192  # nor do its details (the client refuses metadata past 16 KiB)
BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

FUZZER = "nwtok-fuzzer-" + secrets.token_hex(12)
VIEWER = "nwtok-viewer-" + secrets.token_hex(12)
SERVICE_TOKENS = {svc: f"nwtok-{svc}-{secrets.token_hex(12)}" for svc in ("trainer", "deployer", "experiments")}
TOKENS = ",".join(
    [f"{FUZZER}=*:admin:fuzzer", f"{VIEWER}=default:viewer:viewer", *(f"{t}=*:service:{s}" for s, t in SERVICE_TOKENS.items())]
)
PAGE_TOKEN_SECRET = secrets.token_hex(16)

INFERENCE = "neuroweaver.inference.v1.InferenceService"
ALL_SERVICES = [*SERVICES, "inference"]

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
    "projects/*/models/m1",
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
    "latest",
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
    "a\u0000b",
    "\ud7ff\ue000\ufffd",
    "\t\n",
    "file:///etc/passwd",
    "file://../../etc",
    "/proc/1/root",
    "s3://bucket/x",
    "builtin:tiny",
    "builtin:smollm2-135m-instruct",
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
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e308, -1e308, 1e-308, 5e-324, math.inf, -math.inf, math.nan, 2.0, 100.0]
# Same-length replacements for a 13-byte marker that are not UTF-8.
NOT_UTF8 = [
    b"\xff" * 13,
    b"\xfe\xfd\xfc" + b"a" * 10,
    b"abcdefghijk\xc3\x28",  # a lead byte followed by no continuation
    b"\x80" + b"b" * 12,  # a lone continuation byte
    b"\xc0\xaf" + b"c" * 11,  # overlong '/'
    b"\xed\xa0\x80" + b"d" * 10,  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80" + b"e" * 9,  # past U+10FFFF
    b"projects/\xe2\x82",  # cut inside a multi-byte character
]
KINDS = (
    "random",
    "plausible",
    "invalid_utf8",
    "nul",
    "huge_string",
    "huge_repeated",
    "extreme_numbers",
    "random_bytes",
    "mangled",
)


def descriptor(svc: str):
    if svc == "inference":
        module = importlib.import_module("neuroweaver.inference.v1.inference_service_pb2")
        return module.DESCRIPTOR.services_by_name["InferenceService"]
    return service_descriptor(svc)


def full_name(svc: str) -> str:
    return INFERENCE if svc == "inference" else SERVICES[svc][2]


def plausible(svc: str, method):
    if svc != "inference":
        return minimal_request(svc, method)
    request = message_class(method.input_type)()
    if "messages" in method.input_type.fields_by_name:
        request.model = "tiny"
        request.messages.add(role="user", content="Hello")
        request.sampling.max_tokens = 4
    return request


# -- generating requests -----------------------------------------------------------------------------------------------


def _is_map(f) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _skip(f) -> bool:
    return f.message_type is not None and f.message_type.full_name.startswith("google.protobuf.") and not _is_map(f)


def string_slots(desc, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    """Paths to every string a request of this type can hold: ((field, how), ...), `how` in msg/str/key/value."""
    slots = []
    for f in desc.fields:
        if _is_map(f):
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            if key.type == key.TYPE_STRING:
                slots.append((*prefix, (f, "key")))
            if value.type == value.TYPE_STRING:
                slots.append((*prefix, (f, "value")))
        elif f.message_type is not None:
            if not _skip(f) and depth < 3:
                slots.extend(string_slots(f.message_type, (*prefix, (f, "msg")), depth + 1))
        elif f.type == f.TYPE_STRING:
            slots.append((*prefix, (f, "str")))
    return slots


def put_string(msg, slot: tuple, value: str) -> None:
    for f, _ in slot[:-1]:
        if f.is_repeated:
            items = getattr(msg, f.name)
            msg = items[0] if len(items) else items.add()
        else:
            msg = getattr(msg, f.name)
    f, how = slot[-1]
    target = getattr(msg, f.name)
    if how == "key":
        value_field = f.message_type.fields_by_name["value"]
        if value_field.message_type is None:
            target[value] = _zero(value_field)
        else:
            target[value].SetInParent()
    elif how == "value":
        target["k"] = value
    elif f.is_repeated:
        target.append(value)
    else:
        setattr(msg, f.name, value)


def _zero(f):
    return "" if f.type == f.TYPE_STRING else False if f.type == f.TYPE_BOOL else 0


def numeric_fields(msg, depth: int = 0):
    """(message, field) of every numeric or enum field along the message's set and default submessages."""
    for f in msg.DESCRIPTOR.fields:
        if _is_map(f) or _skip(f):
            continue
        if f.message_type is not None:
            if depth < 3:
                subs = list(getattr(msg, f.name)) if f.is_repeated else [getattr(msg, f.name)]
                for sub in subs[:3] or ([getattr(msg, f.name).add()] if f.is_repeated else []):
                    yield from numeric_fields(sub, depth + 1)
        elif f.type not in (f.TYPE_STRING, f.TYPE_BYTES, f.TYPE_BOOL):
            yield msg, f


def repeated_fields(desc, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    out = []
    for f in desc.fields:
        if _is_map(f) or _skip(f):
            continue
        if f.is_repeated:
            out.append((*prefix, f))
        if f.message_type is not None and not f.is_repeated and depth < 3:
            out.extend(repeated_fields(f.message_type, (*prefix, f), depth + 1))
    return out


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def string(self) -> str:
        r = self.rng
        pick = r.random()
        if pick < 0.7:
            return r.choice(STRINGS)
        if pick < 0.85:
            return "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789-_/.:ÄΩ") for _ in range(r.randint(0, 40)))
        return r.choice(STRINGS) + r.choice(["", "/", "/versions/", "/x"]) + r.choice(STRINGS)[:50]

    def number(self, f):
        r = self.rng
        t = f.type
        if t in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
            v = r.choice(FLOATS)
            return v if t == f.TYPE_DOUBLE or not math.isfinite(v) or abs(v) < 3e38 else 3e38
        if t == f.TYPE_ENUM:
            values = [v.number for v in f.enum_type.values]
            return r.choice(values + [len(values), 99, -1, 2**31 - 1, -(2**31)])  # open enums take unknown values
        if t in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32):
            return r.choice(INT32)
        if t in (f.TYPE_INT64, f.TYPE_SINT64, f.TYPE_SFIXED64):
            return r.choice(INT64)
        if t in (f.TYPE_UINT32, f.TYPE_FIXED32):
            return r.choice(UINT32)
        if t in (f.TYPE_UINT64, f.TYPE_FIXED64):
            return r.choice(UINT64)
        raise AssertionError(f"unhandled field type {t}")

    def scalar(self, f):
        if f.type == f.TYPE_STRING:
            return self.string()
        if f.type == f.TYPE_BYTES:
            return self.rng.randbytes(self.rng.choice([0, 1, 16, 1000]))
        if f.type == f.TYPE_BOOL:
            return self.rng.random() < 0.5
        return self.number(f)

    def fill(self, msg, depth: int = 0, density: float = 0.6) -> None:
        r = self.rng
        for f in msg.DESCRIPTOR.fields:
            if r.random() > density:
                continue
            if _is_map(f):
                target = getattr(msg, f.name)
                key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                for _ in range(r.choice([0, 1, 2, 3, 40])):
                    key = self.scalar(key_f)
                    if val_f.message_type is not None:
                        if depth < 3:
                            self.fill(target[key], depth + 1, density)
                    else:
                        target[key] = self.scalar(val_f)
            elif f.message_type is not None:
                if depth >= 3:
                    continue
                if f.is_repeated:
                    for _ in range(r.choice([0, 1, 2, 5])):
                        self.fill(getattr(msg, f.name).add(), depth + 1, density)
                else:
                    sub = getattr(msg, f.name)
                    sub.SetInParent()
                    self.fill(sub, depth + 1, density)
            elif f.is_repeated:
                getattr(msg, f.name).extend(self.scalar(f) for _ in range(r.choice([0, 1, 2, 5, 200])))
            else:
                setattr(msg, f.name, self.scalar(f))

    def random_message(self, svc: str, method):
        msg = message_class(method.input_type)()
        self.fill(msg, density=self.rng.choice([0.2, 0.6, 1.0]))
        return msg

    def plausible_message(self, svc: str, method):
        msg = plausible(svc, method)
        mutant = message_class(method.input_type)()
        self.fill(mutant, density=0.3)
        msg.MergeFrom(mutant)  # overlays a few random fields on the plausible request
        return msg

    def base(self, svc: str, method):
        return self.plausible_message(svc, method) if self.rng.random() < 0.7 else plausible(svc, method)

    # -- kinds --------------------------------------------------------------------------------------------------------

    def payload(self, kind: str, svc: str, method) -> bytes:
        r = self.rng
        slots = string_slots(method.input_type)
        if kind in ("invalid_utf8", "nul", "huge_string") and not slots:
            kind = "mangled"  # a request type without strings (ListModelsRequest {})
        if kind == "random":
            return self.random_message(svc, method).SerializeToString()
        if kind == "plausible":
            return self.plausible_message(svc, method).SerializeToString()
        if kind == "invalid_utf8":
            msg, marker = self.base(svc, method), f"QZX{r.getrandbits(40):010x}"
            put_string(msg, r.choice(slots), marker)
            data = msg.SerializeToString()
            assert data.count(marker.encode()) == 1
            return data.replace(marker.encode(), r.choice(NOT_UTF8))
        if kind == "nul":
            msg = self.base(svc, method)
            value = r.choice(["\x00", "a\x00b", "projects/default/models/m1\x00", "\x00" * 1000, "x" * 100 + "\x00", "é\x00"])
            put_string(msg, r.choice(slots), value)
            return msg.SerializeToString()
        if kind == "huge_string":
            msg = plausible(svc, method)
            unit = r.choice(["a", "projects/default/models/", "é", "😀", "\x00"])
            over = r.random() < 0.25
            size = LIMIT + 100 if over else LIMIT - msg.ByteSize() - 64
            put_string(msg, r.choice(slots), unit * (size // len(unit.encode())))
            return msg.SerializeToString()
        if kind == "huge_repeated":
            msg = plausible(svc, method)
            fields = repeated_fields(method.input_type)
            if not fields:
                return self.random_message(svc, method).SerializeToString()
            path = r.choice(fields)
            container = msg
            for f in path[:-1]:
                container = getattr(container, f.name)
            f = path[-1]
            target = getattr(container, f.name)
            if f.message_type is not None:
                element = message_class(f.message_type)()
                self.fill(element, depth=2, density=0.5)
                count = min(50_000, (LIMIT // 2) // max(element.ByteSize() + 3, 4))
                for _ in range(count):
                    target.add().CopyFrom(element)
            else:
                value = self.scalar(f)
                if isinstance(value, str | bytes):
                    value = value[:8]
                target.extend([value] * min(60_000, (LIMIT // 2) // 12))
            return msg.SerializeToString()
        if kind == "extreme_numbers":
            msg = self.base(svc, method)
            for owner, f in list(numeric_fields(msg)):
                values = [self.number(f) for _ in range(r.choice([1, 3]))] if f.is_repeated else None
                if values is not None:
                    getattr(owner, f.name).extend(values)
                else:
                    setattr(owner, f.name, self.number(f))
            return msg.SerializeToString()
        if kind == "random_bytes":
            return r.randbytes(r.choice([1, 2, 7, 64, 1000, 65536]))
        if kind == "mangled":
            data = bytearray(self.base(svc, method).SerializeToString())
            how = r.choice(["flip", "cut", "append"])
            if how == "flip" and data:
                for _ in range(r.randint(1, 8)):
                    data[r.randrange(len(data))] = r.randrange(256)
            elif how == "cut" and data:
                del data[r.randrange(len(data)) :]
            else:  # unknown fields: a varint, a length-delimited blob, a group start without its end, a fixed32
                data += r.choice(
                    [b"\xf8\xff\x03\x96\x01", b"\xfa\xff\x03\x05hello", b"\xfb\xff\x03", b"\xfd\xff\x03\x01\x02\x03\x04"]
                )
            return bytes(data)
        raise AssertionError(kind)


def case_payloads(svc: str, method, i: int) -> tuple[str, list[bytes], str]:
    """Case `i` of an RPC: its kind, the message(s) to send and which token sends them."""
    rng = random.Random(f"{SEED}:{svc}:{method.name}:{i}")
    gen = Gen(rng)
    kind = KINDS[i % len(KINDS)]
    token = VIEWER if rng.random() < 0.1 else FUZZER
    if method.client_streaming:
        # a few messages: the fuzzed one somewhere among plausible and random ones
        messages = [gen.payload(rng.choice(("plausible", "random")), svc, method) for _ in range(rng.randint(0, 2))]
        messages.insert(rng.randint(0, len(messages)), gen.payload(kind, svc, method))
        return kind, messages, token
    return kind, [gen.payload(kind, svc, method)], token


# -- calling with raw bytes -----------------------------------------------------------------------------------------------


def call_raw(channel, svc: str, method, messages: list[bytes], token: str | None, timeout: float):
    """Sends serialized request bytes (a server stream is read for up to 3 messages); returns (code, error or None)."""
    path = f"/{full_name(svc)}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(messages), metadata=metadata, timeout=timeout)
        elif method.server_streaming:
            call = channel.unary_stream(path)(messages[0], metadata=metadata, timeout=timeout)
            try:
                for _, _ in zip(range(3), call, strict=False):
                    pass
            finally:
                call.cancel()
        else:
            channel.unary_unary(path)(messages[0], metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err
    return grpc.StatusCode.OK, None


def problem_of(method, code, err) -> str | None:
    """What is wrong with an answer, or None."""
    if code in BAD:
        return code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not method.server_streaming:
        return "DEADLINE_EXCEEDED (a unary call hung)"  # a server stream waits for live events: its deadline ends it
    if err is None:
        return None
    details = err.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in details:
        return f"RESOURCE_EXHAUSTED from oversized error metadata ({details[:120]})"
    if len(details) > MAX_MESSAGE_CHARS:
        return f"{code.name} with a {len(details)}-character message (unbounded echo)"
    status_bytes = sum(len(v) for k, v in (err.trailing_metadata() or ()) if k == "grpc-status-details-bin")
    if status_bytes > MAX_DETAILS_BYTES:
        return f"{code.name} with {status_bytes} bytes of details (unbounded echo)"
    return None


def _fuzz_service(svc: str, target: str, failures: list, counts: dict, codes: dict) -> None:
    methods = list(descriptor(svc).methods)
    options = [("grpc.max_send_message_length", 4 * LIMIT), ("grpc.max_receive_message_length", 4 * LIMIT)]
    with grpc.insecure_channel(target, options=options) as ch:
        for i in range(PER_RPC):  # round-robin: every RPC sees the same kinds in the same order
            for method in methods:
                kind, messages, token = case_payloads(svc, method, i)
                timeout = 1.0 if method.server_streaming else 20.0
                code, err = call_raw(ch, svc, method, messages, token, timeout)
                counts[f"{svc}.{method.name}"] = counts.get(f"{svc}.{method.name}", 0) + 1
                codes[(svc, code.name)] = codes.get((svc, code.name), 0) + 1
                problem = problem_of(method, code, err)
                if problem:
                    head = b"|".join(m[:48] for m in messages).hex()
                    failures.append(
                        f"{svc}.{method.name} case {i} ({kind}, seed {SEED}) → {problem}: "
                        f"{(err.details() or '')[:200] if err else ''}\n  payload starts {head}"
                    )


def run_fuzz(procs: dict) -> None:
    failures: list[str] = []
    counts: dict[str, int] = {}
    codes: dict[tuple[str, str], int] = {}
    errors: list[BaseException] = []

    def worker(svc, target):
        try:
            _fuzz_service(svc, target, failures, counts, codes)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(svc, p.target), daemon=True) for svc, p in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    assert not any(t.is_alive() for t in threads), "the fuzzer did not finish"
    assert not errors, errors
    expected = {f"{svc}.{m.name}" for svc in procs for m in descriptor(svc).methods}
    assert set(counts) == expected, f"RPCs never fuzzed: {sorted(expected - set(counts))}"
    assert min(counts.values()) == PER_RPC, counts
    print(
        f"fuzzed {sum(counts.values())} requests over {len(counts)} RPCs ({PER_RPC} per RPC, seed {SEED}): {sorted(codes.items())}"
    )
    for svc in procs:  # the cases reach the handlers: some succeed, some fail validation (not all refused at the door)
        assert codes.get((svc, "OK"), 0) and codes.get((svc, "INVALID_ARGUMENT"), 0), (svc, sorted(codes.items()))
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:40])
    for svc, p in procs.items():
        assert p.proc.poll() is None, f"{svc} died:\n{p.log_text()[-3000:]}"
        assert health_status(p.port, full_name(svc)) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(p.port) == health_pb2.HealthCheckResponse.SERVING
        log = p.log_text()
        assert "Traceback" not in log, f"{svc} logged a traceback:\n{_around(log, 'Traceback')}"


def _around(text: str, needle: str, width: int = 3000) -> str:
    at = text.find(needle)
    return text[max(0, at - 500) : at + width]


# -- the servers ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def services(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with service_databases(request.param, "nwfz") as urls:
        yield from _fuzz_stack(work, urls)


def _fuzz_stack(work, urls):
    def common(svc):
        db = ("--database-url", urls[svc]) if svc in urls else ()
        return ("--auth-tokens", TOKENS, "--page-token-secret", PAGE_TOKEN_SECRET, "--max-message-bytes", str(LIMIT), *db)

    procs = {}
    try:
        registry = procs["registry"] = start_service("registry", work, *common("registry"))
        procs["deployer"] = start_service(
            "deployer", work, *common("deployer"), "--registry-target", registry.target, "--registry-token", SERVICE_TOKENS["deployer"],
            "--artifact-roots", str(work / "artifacts"),
        )  # fmt: skip
        procs["trainer"] = start_service(
            "trainer", work, *common("trainer"), "--no-run-jobs", "--registry-target", registry.target,
            "--registry-token", SERVICE_TOKENS["trainer"],
        )  # fmt: skip
        procs["experiments"] = start_service(
            "experiments", work, *common("experiments"), "--registry-target", registry.target,
            "--deployer-target", procs["deployer"].target, "--service-token", SERVICE_TOKENS["experiments"],
        )  # fmt: skip
        for p in procs.values():
            p.wait_serving()
        seed_default_project(procs)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def seed_default_project(procs: dict) -> None:
    """The resources plausible requests name (nwstack.NAMES), so that mutated requests reach past NOT_FOUND into the
    handlers: model m1 with versions 1.0.0 and 1.0.1 and alias prod, judge j1, a running experiment e1 with exposed
    units. Artifacts lie outside the deployer's artifact roots: no fuzzed deployment starts a model server."""
    from neuroweaver.experiments.v1 import experiment_pb2 as epb
    from neuroweaver.experiments.v1 import experiments_service_pb2 as es
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rs

    def ok(svc, method, request):
        m = descriptor(svc).methods_by_name[method]
        with grpc.insecure_channel(procs[svc].target) as ch:
            stub = ch.unary_unary(f"/{full_name(svc)}/{method}", request_serializer=type(request).SerializeToString,
                                  response_deserializer=message_class(m.output_type).FromString)  # fmt: skip
            return stub(request, metadata=(("authorization", f"Bearer {FUZZER}"),), timeout=30)

    model = "projects/default/models/m1"
    ok(
        "registry",
        "CreateModel",
        rs.CreateModelRequest(parent="projects/default", model_id="m1", model=rpb.Model(display_name="m1")),
    )
    for version in ("1.0.0", "1.0.1"):
        spec = rpb.ModelVersion(
            artifact=rpb.Artifact(uri="file:///srv/outside/adapter", sha256="ab" * 32, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
            lineage=rpb.Lineage(base_model="builtin:smollm2-135m-instruct", method="sft-lora"),
            metrics=[rpb.Metric(name="accuracy", value=0.5, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER)],
        )
        ok("registry", "CreateModelVersion", rs.CreateModelVersionRequest(parent=model, version=version, model_version=spec))
    ok("registry", "SetModelAlias", rs.SetModelAliasRequest(model=model, alias="prod", version="1.0.0"))
    judge = rpb.JudgeVersion(
        kind=rpb.JUDGE_KIND_OPENAI_COMPATIBLE, mode=rpb.JUDGE_MODE_POINTWISE, score_min=1, score_max=10, prompt_template="Rate: {response}",
        openai=rpb.OpenAICompatibleJudge(base_url="http://127.0.0.1:9/v1", model="judge", api_key_env="NW_NO_KEY"),
    )  # fmt: skip
    ok("registry", "CreateJudge", rs.CreateJudgeRequest(parent="projects/default", judge_id="j1", judge_version=judge))
    experiment = epb.Experiment(
        variants=[
            epb.Variant(id="control", model_version=f"{model}/versions/1.0.0", weight=0.5),
            epb.Variant(id="treatment", model_version=f"{model}/versions/1.0.1", weight=0.5),
        ],
        primary_metric=epb.MetricSpec(
            name="latency_ms", kind=epb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_LOWER_IS_BETTER
        ),
        promote_alias="prod",
    )
    ok(
        "experiments",
        "CreateExperiment",
        es.CreateExperimentRequest(parent="projects/default", experiment_id="e1", experiment=experiment),
    )
    ok("experiments", "StartExperiment", es.StartExperimentRequest(name="projects/default/experiments/e1"))
    units = ["a", "u1", "unit-1", "x"]
    ok(
        "experiments",
        "BatchAssignVariants",
        es.BatchAssignVariantsRequest(experiment="projects/default/experiments/e1", unit_ids=units),
    )


class _ModelServerProcess:
    """`python -m neuroweaver_model_server` on free ports, with the same helpers as nwstack's processes."""

    def __init__(self, work: Path, base: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = work / "model-server.log"
        args = [
            sys.executable, "-m", "neuroweaver_model_server", "--host", "127.0.0.1",
            "--grpc-port", str(self.port), "--http-port", "0", "--metrics-port", "-1", "--base-model", base,
            "--served-model-name", "tiny", "--model-version", "projects/default/models/tiny/versions/1.0.0",
            "--project", "default", "--max-new-tokens-limit", "8", "--max-queue", "16", "--max-message-bytes", str(LIMIT),
            "--device", "cpu",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NW_MODEL_SERVER_AUTH_TOKENS": TOKENS, "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_serving(self, timeout: float = 120.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the model server exited:\n{self.log_text()[-3000:]}")
            try:
                return health_status(self.port, INFERENCE, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_for(ready, timeout, "the model server to load the tiny model", interval=0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    from neuroweaver_ml import build_tiny_llama

    work = tmp_path_factory.mktemp("fuzz-model-server")
    base = build_tiny_llama(work / "tiny-llama")
    server = _ModelServerProcess(work, str(base))
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


# -- tests ----------------------------------------------------------------------------------------------------------------


def test_fuzz_every_rpc(services):
    run_fuzz(services)


def test_fuzz_the_model_server(model_server):
    run_fuzz({"inference": model_server})


def _not_utf8(svc: str, method) -> bytes:
    """A plausible request whose first string field (at any depth) holds bytes that are not UTF-8."""
    slots = string_slots(method.input_type)
    assert slots, f"{svc}.{method.name} has no string field"
    msg, marker = plausible(svc, method), "QZX0123456789"
    put_string(msg, slots[0], marker)
    return msg.SerializeToString().replace(marker.encode(), b"\xff\xfe\xfd\xfc" + b"a" * 9)


def check_invalid_utf8_after_authentication(procs: dict) -> None:
    wrong = []
    for svc, p in procs.items():
        with grpc.insecure_channel(p.target) as ch:
            for method in descriptor(svc).methods:
                if not string_slots(method.input_type):
                    continue  # ListModelsRequest {} has nothing to hold a string
                raw = bytes.fromhex("0a04fffefdfc") if (svc, method.name) == ("registry", "GetModel") else _not_utf8(svc, method)
                for token, want in ((None, grpc.StatusCode.UNAUTHENTICATED), (FUZZER, grpc.StatusCode.INVALID_ARGUMENT)):
                    code, err = call_raw(ch, svc, method, [raw], token, 10.0)
                    if code != want:
                        detail = (err.details() or "")[:150] if err else ""
                        wrong.append(
                            f"{svc}.{method.name} ({'token' if token else 'no token'}): {code.name}, expected {want.name} {detail}"
                        )
    assert not wrong, "\n".join(wrong)


def test_invalid_utf8_is_invalid_argument_after_authentication(services):
    """The issue's repro `0a04fffefdfc` (a GetModelRequest whose name is 4 bytes that are not UTF-8) and the same
    for every RPC (the first string field, however deep): without a token UNAUTHENTICATED (authentication comes
    first), with one INVALID_ARGUMENT."""
    check_invalid_utf8_after_authentication(services)


def test_invalid_utf8_on_the_model_server(model_server):
    check_invalid_utf8_after_authentication({"inference": model_server})


def test_nul_in_any_string_field_is_invalid_argument_naming_the_field(services):
    """A NUL character in any string field of any request (nested, repeated, map keys and values), inside an otherwise
    plausible request, is refused by validation with a field violation that names the field: never stored (PostgreSQL
    refuses it: INTERNAL) and never INTERNAL."""
    wrong: dict[tuple[str, str], str] = {}
    for svc, p in services.items():
        with grpc.insecure_channel(p.target) as ch:
            for method in descriptor(svc).methods:
                for slot in string_slots(method.input_type):
                    msg = plausible(svc, method)
                    put_string(msg, slot, "nul\x00inside")
                    code, err = call_raw(
                        ch, svc, method, [msg.SerializeToString()], FUZZER, 2.0 if method.server_streaming else 20.0
                    )
                    fields = [v.field for v in field_violations(err)] if err is not None else []
                    if code != grpc.StatusCode.INVALID_ARGUMENT or not any(slot[-1][0].name in v for v in fields):
                        where = (f"{svc}.{method.name}", ".".join(f.name for f, _ in slot))
                        wrong[where] = f"{code.name} {fields} {(err.details() or '')[:120] if err else ''}"
    assert not wrong, f"{len(wrong)} string fields took a NUL:\n" + "\n".join(f"{r} {f}: {v}" for (r, f), v in wrong.items())
