"""Child processes that must not outlive the service that started them (workers, local model servers)."""

from __future__ import annotations

import ctypes
import os
import signal

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
