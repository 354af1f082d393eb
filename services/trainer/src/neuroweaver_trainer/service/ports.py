"""What the use cases, the scheduler and the event feeds need from outside: storage (repositories inside a unit of
work), the registry, input checks and the places workers run.

`adapters/` implements these (SQLAlchemy on SQLite and PostgreSQL, the registry client, the local and Kubernetes
executors); the unit tests implement storage in memory. Jobs are addressed by `TrainingJob.key` once stored.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Protocol

from neuroweaver_runtime.errors import DomainError
from neuroweaver_runtime.filtering import Comparison
from neuroweaver_runtime.process import Child

from ..domain.job import JobEvent, JobState, TrainingJob
from ..domain.scheduling import QueuedJob, Usage

# Exit code of a worker that stopped because it was asked to (SIGTERM at shutdown), not because it failed.
EXIT_INTERRUPTED = 75


def notify_key(job_key: int) -> str:
    """Notifier key of a job's event stream (a NOTIFY or worker-pipe payload is `<key>:<sequence>`)."""
    return f"job{job_key}"


class JobRepository(Protocol):
    """Training jobs, their gap-free event sequences and the durable queue. `fence_attempt` makes a write conditional
    on the job still being in that attempt (the lease's fencing token); such writes report whether they happened."""

    async def get(self, name: str, *, lock: bool = False) -> TrainingJob | None:
        """`lock`: hold the job's row lock until the end of the transaction."""

    async def get_by_key(self, key: int) -> TrainingJob | None: ...
    async def add(self, job: TrainingJob, project: str) -> None:
        """Stores a new job and sets its `key`; raises the unit of work's duplicate error when the name exists."""

    async def update(self, key: int, *, fence_attempt: int | None = None, **values: Any) -> bool:
        """Sets the named columns; True when the job was there (and, with `fence_attempt`, still in that attempt)."""

    async def delete(self, key: int) -> None:
        """The job and its events."""

    async def page(
        self, project: str, filters: list[Comparison], desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[TrainingJob], list | None]:
        """Up to `limit` jobs by create time after `cursor`, and the cursor after the last one if more follow."""

    async def append_event(self, key: int, event: JobEvent, *, fence_attempt: int | None = None) -> int | None:
        """Appends the event with the job's next sequence (gap-free, committed in order) and announces it to other
        processes once committed; None when the fence no longer holds."""

    async def events_after(self, key: int, job_name: str, after: int, limit: int) -> list[JobEvent]: ...
    async def last_sequence(self, key: int) -> tuple[int, str] | None:
        """(last sequence, state) of a job, or None when it was deleted."""

    async def lock_queue(self) -> None:
        """Serialises claims across replicas until the transaction ends (quota counts must not race)."""

    async def expired(self, executors: list[str], limit: int = 20) -> list[TrainingJob]:
        """Active jobs whose lease expired (their worker or replica died), in queue order. Leases are timed by the
        store's clock (the database's), never the caller's: replicas with skewed clocks agree on which are live."""

    async def queued(self, executors: list[str] | None = None, limit: int = 1000) -> list[QueuedJob]:
        """Queued jobs in queue order: priority (highest first), then age."""

    async def usage(self) -> dict[str, Usage]:
        """Jobs and GPUs held by each project's active jobs."""

    async def claim(self, key: int, owner: str, lease_seconds: float) -> TrainingJob | None:
        """Takes the lease of a queued job (or an active one whose lease expired) for `owner`; None when it is no
        longer claimable. Returns the job as it was before the claim."""

    async def hand_back(self, key: int, attempt: int, state: JobState) -> bool:
        """The attempt gives the job back (PAUSED or QUEUED): lease released, controls cleared, attempt yielded."""

    async def request_checkpoint(self, key: int) -> None:
        """Asks the job's worker for a checkpoint (it polls the count)."""

    async def renew_leases(self, owner: str, keys: list[int], lease_seconds: float) -> dict[int, tuple[str, str]]:
        """Extends the leases this owner still holds to `lease_seconds` from now (the store's clock);
        {job key: (state, lease owner)} of every listed job."""


class UnitOfWork(Protocol):
    """One transaction: the jobs, idempotency keys, the mapping of integrity errors and the wake-ups of the jobs'
    watchers. It commits when its block ends without an exception and rolls back otherwise."""

    @property  # read-only: a mutable protocol attribute would be invariant and refuse the SQL repository
    def jobs(self) -> JobRepository: ...

    async def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        """The resource an earlier call with this request_id created (AIP-155), or None; REQUEST_ID_REUSED when the
        id came with another method or body."""

    async def remember_request(self, request_id: str, method: str, fingerprint: str, resource: str) -> None: ...
    def duplicate(self, error: DomainError) -> AbstractContextManager[None]:
        """Raises `error` instead of a unique-constraint violation from the block."""

    def wake(self, key: int) -> None:
        """Wakes the job's watchers (and the event feed) in this process once the transaction commits."""


class UnitOfWorkFactory(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[UnitOfWork, bool | None]: ...


class RegistryLookups(Protocol):
    """What RLAIF and EXPORT jobs resolve in the registry at create time (NOT_FOUND / UNAVAILABLE ... as domain errors)."""

    async def judge(self, judge_version: str) -> dict[str, Any]:
        """The judge version's configuration (`name` is the concrete version, also for `latest`)."""

    async def start_version(self, model_version: str) -> tuple[str, str, str, str]:
        """(version name, adapter uri, adapter sha256, base model) of the version an RLAIF job starts from."""

    async def export_version(self, model_version: str) -> tuple[str, str, str, str]:
        """The same of the version an EXPORT job exports (field `training_job.export.model_version`)."""


# check_inputs(base_model, dataset_uri, eval_dataset_uri, dataset_roots, max_seq_length, model_cache_dir, *,
# model_roots, method, prompts_uri, eval_prompts_uri) → digests and row counts (adapters/inputs.py)
InputCheck = Callable[..., Any]


@dataclass
class DatasetPreview:
    """A dataset's first rows and what its check found (PreviewDataset)."""

    rows: list[tuple[int, dict[str, Any], bool]]  # (1-based line, row, cut short)
    row_count: int
    format: str
    sha256: str
    size_bytes: int
    problems: list[tuple[int | None, str]] = field(default_factory=list)  # (1-based line or None, message)
    problems_truncated: bool = False


# preview_dataset(dataset_uri, dataset_roots, *, method, base_model, max_seq_length, chat_template, model_cache_dir,
# model_roots, max_rows) → DatasetPreview, with the path and model rules of check_inputs (adapters/inputs.py)
DatasetPreviewer = Callable[..., DatasetPreview]


@dataclass(frozen=True)
class LogQuery:
    """What to read of a worker's log (ReadTrainingJobLogs)."""

    lines: int  # without `offset`: the last `lines`; with it: at most `lines` from there on
    offset: int | None = None  # a position an earlier read returned (LogChunk.next_offset)
    live: bool = False  # the attempt may still write: a last line without its line end is held back until complete


@dataclass
class LogChunk:
    lines: list[str]
    truncated: bool  # lines in the range asked for were left out (before the first; after the last with an offset)
    next_offset: int  # where the next read starts


class LogUnavailable(Exception):
    """The attempt has no log that can be read (yet); the message says why."""


class LocalWorkers(Protocol):
    """Worker subprocesses on this machine."""

    async def start(self, job: TrainingJob, attempt: int, on_event: Callable[[str], None], devices: list[str]) -> Child:
        """`devices`: the GPU indices the worker may use (its CUDA_VISIBLE_DEVICES; [] = none)."""

    def signal(self, proc: Child, sig: int) -> None: ...
    def log_path(self, job_id: str, attempt: int) -> str | PathLike[str]: ...
    async def read_log(self, job_id: str, attempt: int, query: LogQuery) -> LogChunk | None:
        """The attempt's output as its worker wrote it on this machine; None when this machine has no such log."""


class ClusterJobState(Protocol):
    # read-only, so that the executor's frozen dataclass matches
    @property
    def phase(self) -> str: ...  # Pending, Running, Succeeded, Failed, Missing
    @property
    def reason(self) -> str: ...


class ClusterWorkers(Protocol):
    """Workers as Kubernetes Jobs (`ref` = namespace/name)."""

    async def start(self, job: TrainingJob) -> str: ...
    async def state(self, ref: str) -> ClusterJobState: ...
    async def delete(self, ref: str) -> bool: ...
    async def read_log(self, job: TrainingJob, query: LogQuery) -> LogChunk:
        """The log of the job's newest worker pod; LogUnavailable when there is none to read."""
