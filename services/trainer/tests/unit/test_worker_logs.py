"""Bounded reads of worker logs (adapters/logs.py): a file's tail read backwards, forward reads from an offset, the
line a running worker is still writing, and pod logs with their timestamps as offsets."""

from __future__ import annotations

import pytest

from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_trainer.adapters import logs
from neuroweaver_trainer.adapters.logs import parse_pod_log, pod_log_params, read_log_file
from neuroweaver_trainer.service.ports import LogQuery


def write(tmp_path, data: bytes):
    path = tmp_path / "worker-1.log"
    path.write_bytes(data)
    return path


def test_tail_and_forward_reads_cover_the_file_once(tmp_path):
    lines = [f"line {i}" for i in range(1, 1001)]
    data = "".join(f"{line}\n" for line in lines).encode()
    path = write(tmp_path, data)
    tail = read_log_file(path, LogQuery(10))
    assert tail is not None and tail.lines == lines[-10:] and tail.truncated and tail.next_offset == len(data)
    whole = read_log_file(path, LogQuery(5000))
    assert whole is not None and whole.lines == lines and not whole.truncated
    # forward from 0 in pages of 300 lines: every line once, in order; `truncated` while more follow
    got, offset, pages = [], 0, 0
    while True:
        chunk = read_log_file(path, LogQuery(300, offset))
        assert chunk is not None
        got += chunk.lines
        offset, pages = chunk.next_offset, pages + 1
        if not chunk.truncated:
            break
    assert got == lines and offset == len(data) and pages == 4
    assert read_log_file(path, LogQuery(300, len(data))).lines == []  # nothing new yet
    with pytest.raises(InvalidArgument) as exc:
        read_log_file(path, LogQuery(10, len(data) + 1))
    assert exc.value.violations[0].field == "offset"
    assert read_log_file(tmp_path / "missing.log", LogQuery(10)) is None


def test_a_running_workers_unfinished_line_waits(tmp_path):
    path = write(tmp_path, b"one\ntwo\nthr")
    live = read_log_file(path, LogQuery(10, live=True))
    assert live.lines == ["one", "two"] and live.next_offset == 8 and not live.truncated
    assert read_log_file(path, LogQuery(10, 8, live=True)).lines == []
    with open(path, "ab") as f:
        f.write(b"ee\n")
    assert read_log_file(path, LogQuery(10, 8, live=True)).lines == ["three"]
    # once the attempt is over, a last line without its line end is a line
    path = write(tmp_path, b"one\ntwo\nlast words")
    assert read_log_file(path, LogQuery(10)).lines == ["one", "two", "last words"]
    assert read_log_file(path, LogQuery(10, 8)).lines == ["last words"]


def test_bytes_become_text_as_a_terminal_shows_them(tmp_path):
    path = write(tmp_path, b"caf\xc3\xa9 \xff\xfe\r\n 10%\r 50%\r100%\nok\n")
    assert read_log_file(path, LogQuery(10)).lines == ["café \ufffd\ufffd", "100%", "ok"]


def test_a_huge_log_is_read_from_its_end_only(tmp_path, monkeypatch):
    path = tmp_path / "big.log"
    with open(path, "wb") as f:
        f.write((b"x" * 99 + b"\n") * 200_000)  # 20 MB
        f.write(b"".join(f"tail {i}\n".encode() for i in range(10)))
    reads: list[int] = []
    real_open = open

    class Counting:
        """The opened file, with each read's size recorded."""

        def __init__(self, f) -> None:
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr(logs, "open", lambda *a, **kw: Counting(real_open(*a, **kw)), raising=False)
    tail = read_log_file(path, LogQuery(10))
    assert tail.lines == [f"tail {i}" for i in range(10)] and tail.truncated
    assert -1 not in reads and sum(reads) <= 2 * logs.BLOCK
    # a line longer than one answer's bytes comes in pieces, never all at once
    path = write(tmp_path, b"y" * (logs.MAX_BYTES + 10) + b"\nend\n")
    first = read_log_file(path, LogQuery(10, 0))
    assert len(first.lines) == 1 and len(first.lines[0]) == logs.MAX_BYTES and first.truncated
    assert read_log_file(path, LogQuery(10, first.next_offset)).lines == ["y" * 10, "end"]
    tail = read_log_file(path, LogQuery(5))
    assert tail.lines[-1] == "end" and tail.truncated and len(tail.lines[0]) < logs.MAX_BYTES + 10


def test_pod_logs_use_line_times_as_offsets():
    data = b"2026-12-08T10:00:00.000000001Z first\n2026-12-08T10:00:00.5Z second\n2026-12-08T10:00:01.000000000Z third\n"
    t1 = 1_796_724_000 * 1_000_000_000
    assert logs.stamp_ns(data.split(b"\n")[0]) == (t1 + 1, b"first")
    tail = parse_pod_log(data, LogQuery(2))
    assert tail.lines == ["second", "third"] and tail.truncated and tail.next_offset == t1 + 1_000_000_000
    assert pod_log_params(LogQuery(2)) == {"timestamps": True, "limit_bytes": logs.MAX_BYTES, "tail_lines": 3}
    # from an offset: the lines of its second up to it are dropped (sinceTime has whole seconds)
    params = pod_log_params(LogQuery(100, t1 + 1))
    assert params["since_time"] == "2026-12-08T10:00:00Z" and "tail_lines" not in params
    after = parse_pod_log(data, LogQuery(100, t1 + 1))
    assert after.lines == ["second", "third"] and not after.truncated
    assert parse_pod_log(data, LogQuery(1, t1 + 1)).lines == ["second"]
    assert parse_pod_log(b"", LogQuery(100, t1)).next_offset == t1
