"""Which queued job runs next, why the others wait, and which running jobs to preempt (no SQL, no I/O).

Order: higher priority first, then older first. A job runs when its project's quota (concurrent jobs, GPUs)
has room and, for a local job, the replica has enough free GPUs; a job that does not fit is skipped for now
and later ones may run (backfill). A job that fits its quota but not a replica may preempt running jobs of
lower priority on that replica: they save a checkpoint, go back to the queue and resume from it later.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Quota:
    """Caps of one project across all replicas (None = no cap). `max_priority` bounds the priority its jobs may ask
    for: on a shared trainer a project could otherwise preempt every other project's work."""

    max_jobs: int | None = None
    max_gpus: int | None = None
    max_priority: int | None = None


@dataclass
class Quotas:
    """Per-project quotas, with a default for projects not named."""

    projects: dict[str, Quota] = field(default_factory=dict)
    default: Quota = Quota()

    def of(self, project: str) -> Quota:
        return self.projects.get(project, self.default)

    @classmethod
    def parse(cls, text: str) -> Quotas:
        """`team-a=jobs:2,gpus:4,priority:100;team-b=jobs:1;*=gpus:8,priority:0` (`*` is every other project).
        Raises ValueError."""
        out = cls()
        for entry in filter(None, (e.strip() for e in text.split(";"))):
            project, sep, limits = entry.partition("=")
            project = project.strip()
            if not sep or not (project == "*" or re.fullmatch(r"[a-z][a-z0-9-]{0,62}", project)):
                raise ValueError(f"quota entry {entry!r} is not <project>=jobs:<n>,gpus:<n> (or *=...)")
            caps: dict[str, int] = {}
            for part in filter(None, (x.strip() for x in limits.split(","))):
                key, _, value = part.partition(":")
                if not (key in ("jobs", "gpus") and value.isdigit() or key == "priority" and re.fullmatch(r"-?\d+", value)):
                    raise ValueError(f"quota {part!r} of {project} is not jobs:<n>, gpus:<n> or priority:<n>")
                caps[key] = int(value)
            if not caps:
                raise ValueError(f"quota entry {entry!r} sets no limit")
            quota = Quota(caps.get("jobs"), caps.get("gpus"), caps.get("priority"))
            if project == "*":
                out.default = quota
            else:
                out.projects[project] = quota
        return out


@dataclass
class Usage:
    """What a project's active jobs hold right now."""

    jobs: int = 0
    gpus: int = 0


@dataclass(frozen=True)
class QueuedJob:
    key: int
    name: str
    project: str
    priority: int
    gpus: int
    local: bool  # runs on a replica (needs that replica's free GPUs) rather than as a Kubernetes Job


@dataclass(frozen=True)
class RunningJob:
    key: int
    name: str
    priority: int
    gpus: int  # devices of this replica it holds (0 for Kubernetes jobs)
    started: float  # monotonic start on this replica: the newest loses the least work when preempted


@dataclass(frozen=True)
class Capacity:
    """One replica: how many jobs it runs at once, how many GPUs it has and how many are free."""

    slots: int
    free_slots: int
    gpus: int
    free_gpus: int


def quota_block(job: QueuedJob, quota: Quota, usage: Usage) -> str:
    """Why the project's quota keeps `job` waiting ("" when it fits)."""
    if quota.max_jobs is not None and usage.jobs >= quota.max_jobs:
        return f"project {job.project} runs {usage.jobs} of its {quota.max_jobs} concurrent jobs (quota)"
    if job.gpus and quota.max_gpus is not None and usage.gpus + job.gpus > quota.max_gpus:
        return f"needs {job.gpus} GPUs; project {job.project} uses {usage.gpus} of its {quota.max_gpus} (quota)"
    return ""


def capacity_block(job: QueuedJob, capacity: Capacity) -> str:
    """Why this replica cannot start `job` now ("" when it can)."""
    if job.local and job.gpus > capacity.gpus:
        return f"needs {job.gpus} GPUs; a replica of this trainer has {capacity.gpus}"
    if capacity.free_slots <= 0:
        return f"every slot is busy ({capacity.slots} concurrent jobs per replica)"
    if job.local and job.gpus > capacity.free_gpus:
        return f"needs {job.gpus} GPUs; {capacity.free_gpus} of {capacity.gpus} are free"
    return ""


def next_runnable(queue: Sequence[QueuedJob], usage: dict[str, Usage], quotas: Quotas, capacity: Capacity) -> QueuedJob | None:
    """The first job in queue order (priority desc, then age) that fits its quota and this replica."""
    for job in queue:
        if not quota_block(job, quotas.of(job.project), usage.get(job.project, Usage())) and not capacity_block(job, capacity):
            return job
    return None


def wait_reasons(queue: Sequence[QueuedJob], usage: dict[str, Usage], quotas: Quotas, capacity: Capacity) -> dict[int, str]:
    """Why each queued job waits, as the scheduler of a replica like this one would decide it now."""
    reasons: dict[int, str] = {}
    ahead = 0
    for job in queue:
        reason = quota_block(job, quotas.of(job.project), usage.get(job.project, Usage()))
        if not reason and job.local and job.gpus > capacity.gpus:
            reason = capacity_block(job, capacity)
        if not reason:
            reason = f"{ahead} runnable job{'s' if ahead != 1 else ''} ahead; waiting for a free slot" + (
                f" with {job.gpus} free GPUs" if job.local and job.gpus else ""
            )
            ahead += 1
        reasons[job.key] = reason
    return reasons


def preemption_victims(job: QueuedJob, running: Iterable[RunningJob], capacity: Capacity) -> list[RunningJob]:
    """The fewest lower-priority running jobs whose room lets `job` start on this replica (lowest priority first,
    then the most recently started); [] when it starts without preemption or cannot start even with it."""
    need_slots = 0 if capacity.free_slots > 0 else 1
    need_gpus = max(0, job.gpus - capacity.free_gpus) if job.local else 0
    if job.local and job.gpus > capacity.gpus:
        return []
    if not need_slots and not need_gpus:
        return []
    candidates = sorted((r for r in running if r.priority < job.priority), key=lambda r: (r.priority, -r.started))
    victims: list[RunningJob] = []
    slots = gpus = 0
    for r in candidates:
        if slots >= need_slots and gpus >= need_gpus:
            break
        if need_gpus > gpus and not r.gpus and slots >= need_slots:
            continue  # frees no GPU, and the slot is already found
        victims.append(r)
        slots += 1
        gpus += r.gpus
    return victims if slots >= need_slots and gpus >= need_gpus else []
