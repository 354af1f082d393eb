"""Reading workers' logs in bounded pieces (ReadTrainingJobLogs).

A local worker's log is a file that may grow to gigabytes: its tail is found by reading blocks backwards from the end
and a follow-up read seeks to its offset, so one answer never reads more than MAX_BYTES (+ one block) of it. A pod's
log comes from the Kubernetes API with `timestamps=true`; the time of its last line is the offset of the next read
(`sinceTime` has whole seconds: the lines of that second up to the offset are dropped here).
"""

from __future__ import annotations

import calendar
import os
import re
import time
from datetime import UTC, datetime
from typing import Any, BinaryIO

from neuroweaver_runtime.errors import InvalidArgument

from ..service.ports import LogChunk, LogQuery

MAX_BYTES = 1 << 20  # of log per answer: well under gRPC's default 4 MiB message limit
BLOCK = 64 << 10


def text(line: bytes) -> str:
    """A line as a terminal shows it: its last carriage-return rewrite (a progress bar's final state), UTF-8 with
    replacement characters for invalid bytes."""
    line = line.removesuffix(b"\r")
    if b"\r" in line:
        line = next((part for part in reversed(line.split(b"\r")) if part), b"")
    return line.decode("utf-8", errors="replace")


def read_log_file(path: str | os.PathLike[str], query: LogQuery) -> LogChunk | None:
    """The tail of the file, or its lines from `query.offset`; None when there is no such file."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the size is taken from the open file
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if query.offset is None:
            return _tail(f, size, query.lines, query.live)
        if query.offset > size:
            raise InvalidArgument(
                f"offset {query.offset} is past the end of the log ({size} bytes); pass the next_offset of an earlier read",
                field="offset",
            )
        return _forward(f, size, query.offset, query.lines, query.live)


def _tail(f: BinaryIO, size: int, n: int, live: bool) -> LogChunk:
    """The last `n` lines: blocks read backwards until n + 2 line ends are in hand (n complete lines, the line
    before them and a held-back last line) or MAX_BYTES are."""
    pos, buf, ends = size, b"", 0
    while pos > 0 and ends < n + 2 and len(buf) < MAX_BYTES:
        step = min(BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        ends += block.count(b"\n")
        buf = block + buf
    end = size
    if live and not buf.endswith(b"\n"):  # the worker is still writing its last line: it comes with a later read
        cut = buf.rfind(b"\n")
        end = pos + cut + 1 if cut >= 0 else pos
        buf = buf[: cut + 1] if cut >= 0 else b""
    pieces = buf.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    truncated = pos > 0
    if pos > 0 and pieces:
        f.seek(pos - 1)
        if f.read(1) != b"\n" and len(pieces) > 1:
            pieces.pop(0)  # began inside a line: the lines after it are whole
    if len(pieces) > n:
        pieces, truncated = pieces[-n:], True
    return LogChunk([text(p) for p in pieces], truncated, end)


def _forward(f: BinaryIO, size: int, offset: int, max_lines: int, live: bool) -> LogChunk:
    """Up to `max_lines` whole lines from `offset`, reading at most MAX_BYTES."""
    f.seek(offset)
    data = f.read(min(MAX_BYTES, size - offset))
    at_end = offset + len(data) >= size
    pieces = data.split(b"\n")
    rest = pieces.pop()  # b"" after a line end, else the start of a line the read did not finish
    if len(pieces) > max_lines:
        pieces = pieces[:max_lines]
        return LogChunk([text(p) for p in pieces], True, offset + sum(len(p) + 1 for p in pieces))
    end, truncated = offset + len(data) - len(rest), not at_end
    if rest:
        if not at_end and not pieces:  # one line longer than MAX_BYTES: it comes in pieces
            pieces, end = [rest], offset + len(data)
        elif at_end and not live:  # the worker is done: its last line has no line end
            pieces, end = [*pieces, rest], size
    return LogChunk([text(p) for p in pieces], truncated, end)


# -- pod logs (Kubernetes) -----------------------------------------------------------------------------------------

_STAMP = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ?")


def stamp_ns(raw: bytes) -> tuple[int, bytes] | None:
    """(Unix nanoseconds, the rest of the line) of a line the API gave with `timestamps=true` (RFC 3339)."""
    m = _STAMP.match(raw)
    if m is None:
        return None
    seconds = calendar.timegm(time.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%S"))
    zone = m.group(3)
    if zone != b"Z":
        sign = 1 if zone[:1] == b"+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = (m.group(2) or b"").ljust(9, b"0")
    return seconds * 1_000_000_000 + int(fraction), raw[m.end() :]


def pod_log_params(query: LogQuery) -> dict[str, Any]:
    """The pods/log query for a LogQuery: the last lines (one more, to tell whether there were more), or the lines
    since the offset's second."""
    params: dict[str, Any] = {"timestamps": True, "limit_bytes": MAX_BYTES}
    if query.offset is None:
        params["tail_lines"] = query.lines + 1
    elif query.offset > 0:
        since = datetime.fromtimestamp(query.offset // 1_000_000_000, UTC)
        params["since_time"] = since.strftime("%Y-%m-%dT%H:%M:%SZ")
    return params


def parse_pod_log(data: bytes, query: LogQuery) -> LogChunk:
    """The answer to `pod_log_params(query)` as a LogChunk; offsets are the lines' times in Unix nanoseconds."""
    limited = len(data) >= MAX_BYTES
    raw = data.split(b"\n")
    last = raw.pop()  # b"" after the last line end; else a line cut by limit_bytes
    truncated = limited and bool(last)
    after = query.offset or 0
    lines: list[tuple[int, bytes]] = []
    for line in raw:
        parsed = stamp_ns(line)
        ts, body = parsed if parsed is not None else (lines[-1][0] if lines else after, line)
        if query.offset is None or ts > after:
            lines.append((ts, body))
    if query.offset is None:
        if len(lines) > query.lines:
            lines, truncated = lines[-query.lines :], True
    elif len(lines) > query.lines:
        lines, truncated = lines[: query.lines], True
    next_offset = lines[-1][0] if lines else after
    return LogChunk([text(body) for _, body in lines], truncated, next_offset)
