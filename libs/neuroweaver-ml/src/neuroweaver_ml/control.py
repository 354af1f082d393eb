"""How the owner of a running training steers it between optimizer steps (thread-safe).

`should_stop` is any `() -> bool`; a `StopSignal` also asks for checkpoints: one now (the training goes on)
or one before it stops (pause, preemption), so the next attempt resumes from that very step. Under
`torch.distributed.run` rank 0's owner decides for every rank (broadcast after each step): ranks that stopped at
different steps would wait on each other's collectives for ever.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def world_size() -> int:
    """Training processes of this run (torch.distributed.run sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of the run: the one that writes events, files and results."""
    return int(os.environ.get("RANK", "0")) == 0


class StopSignal(threading.Event):
    """Set → the training stops after its current step. Callable, so it is a `should_stop` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.keep_progress = False  # save a checkpoint before stopping
        self._checkpoint = threading.Event()

    def __call__(self) -> bool:
        return self.is_set()

    def stop(self, *, keep_progress: bool = False) -> None:
        self.keep_progress = self.keep_progress or keep_progress
        self.set()

    def request_checkpoint(self) -> None:
        self._checkpoint.set()

    def checkpoint_due(self) -> bool:
        """Whether a checkpoint was requested since the last call (the request is taken)."""
        due = self._checkpoint.is_set()
        self._checkpoint.clear()
        return due


def after_step(should_stop: Callable[[], bool] | None, control) -> bool:
    """Applies the owner's wishes to an HF TrainerControl after a step; True when the training is to stop.

    A requested checkpoint is saved at this step (HF saves when `should_save` is set after `on_step_end`); a stop
    saves first only when the signal keeps progress (a cancel keeps the last periodic checkpoint instead)."""
    signal = should_stop if isinstance(should_stop, StopSignal) else None
    save = signal is not None and signal.checkpoint_due()
    stop = should_stop is not None and should_stop()
    if stop:
        save = save or (signal is not None and signal.keep_progress)
    stop, save = _agreed(stop, save)
    if stop:
        control.should_training_stop = True
        control.should_save = save
        return True
    if save:
        control.should_save = True
    return False


def _agreed(stop: bool, save: bool) -> tuple[bool, bool]:
    """Rank 0's decision, on every rank of a distributed run (as given otherwise)."""
    if world_size() == 1:
        return stop, save
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return stop, save
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    decision = torch.tensor([int(stop), int(save)], device=device)
    dist.broadcast(decision, src=0)
    return bool(decision[0]), bool(decision[1])
