"""`spawn`: children started from a uvloop loop in a multi-threaded process, the deployer's situation."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

import uvloop

from neuroweaver_runtime.process import spawn

CHILD = "import os, sys; os.write(int(sys.argv[1]), b'hello'); sys.exit(int(sys.argv[2]))"


def test_children_of_a_threaded_uvloop_process_run_and_report_their_exit(tmp_path):
    """uvloop's own spawn ran Python's after-fork hooks in the child; 20 children started while busy threads run
    must each execute, write through a passed fd, and report their exit code (or signal) through `wait`."""
    stop = threading.Event()
    busy = [threading.Thread(target=lambda: [sum(range(1000)) for _ in iter(stop.is_set, True)], daemon=True) for _ in range(4)]
    for t in busy:
        t.start()

    async def main():
        import os

        results = []
        for i in range(20):
            read_fd, write_fd = os.pipe()
            with open(tmp_path / "child.log", "ab") as log:
                child = spawn([sys.executable, "-c", CHILD, str(write_fd), str(i % 3)], log=log, env=dict(os.environ), pass_fds=(write_fd,))
            os.close(write_fd)
            code = await asyncio.wait_for(child.wait(), 60)
            results.append((code, os.read(read_fd, 16), child.returncode))
            os.close(read_fd)
        sleeper = spawn([sys.executable, "-c", "import time; time.sleep(60)"], log=open(os.devnull, "wb"), env=dict(os.environ))
        assert sleeper.returncode is None
        waiters = [asyncio.ensure_future(sleeper.wait()) for _ in range(2)]  # two waiters, as stop() and the supervisor
        sleeper.kill()
        return results, await asyncio.wait_for(asyncio.gather(*waiters), 30)

    try:
        results, killed = uvloop.run(main())
    finally:
        stop.set()
    assert results == [(i % 3, b"hello", i % 3) for i in range(20)]
    assert killed == [-signal.SIGKILL, -signal.SIGKILL]
