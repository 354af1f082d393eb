"""Child processes that must not outlive the service that started them (workers, local model servers)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Called by the child itself at start-up: the kernel sends `sig` when the parent dies.

    Done in the child's own main rather than a `preexec_fn`: running Python between fork and exec in a
    multi-threaded parent (grpc, uvloop, tokenizers) crashed children with SIGSEGV in tests.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):  # not Linux: nothing to arrange
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Child:
    """A child process started by `spawn`; the subset of `asyncio.subprocess.Process` the services use."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        """The exit code, once the child has exited: its pidfd is watched by the event loop (no thread per child)."""
        if self._popen.poll() is None:
            try:
                fd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # no pidfd (not Linux ≥ 5.3): a thread waits instead
                return await asyncio.to_thread(self._popen.wait)
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(fd, on_exit)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        return self._popen.wait()

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()


def spawn(args: Sequence[str], *, log, env: dict[str, str], pass_fds: Sequence[int] = ()) -> Child:
    """Starts `args` in its own session, stdin closed, stdout and stderr to the open file `log`.

    Through `subprocess.Popen`, whose fork+exec runs no Python in the child, whatever the event loop: uvloop's
    `create_subprocess_exec` runs Python's after-fork hooks in the child before exec, and in a multi-threaded
    parent serving grpc.aio that crashed children with SIGSEGV before they wrote a byte.
    """
    popen = subprocess.Popen(
        list(args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        pass_fds=tuple(pass_fds),
    )  # fmt: skip
    return Child(popen)
