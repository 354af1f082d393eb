"""The worker's flags (env NW_TRAINER_*); the executors in adapters/executors.py pass them."""

from __future__ import annotations

from dataclasses import dataclass, field

from neuroweaver_runtime.config import default_data_dir


@dataclass
class WorkerConfig:
    job: str = field(default="", metadata={"help": "training job name, projects/{project}/trainingJobs/{job}"})
    attempt: int = field(default=0, metadata={"help": "attempt number (fencing token); 0 = the job's current attempt"})
    database_url: str = field(default="", metadata={"help": "the trainer's database"})
    data_dir: str = field(default_factory=default_data_dir, metadata={"help": "data directory (work dirs, artifacts)"})
    artifacts_dir: str = field(default="", metadata={"help": "artifact store directory; default <data dir>/artifacts"})
    checkpoint_dir: str = field(default="", metadata={"help": "where checkpoints live (a PVC on Kubernetes)"})
    registry_target: str = field(default="127.0.0.1:50051", metadata={"help": "registry gRPC address"})
    registry_token: str = field(default="", metadata={"help": "bearer token for the registry"})
    registry_retry_seconds: float = field(default=120.0, metadata={"help": "keep retrying an unreachable registry this long"})
    client_tls_ca: str = field(default="", metadata={"help": "CA bundle (PEM) that verifies the registry; set = TLS"})
    client_tls_cert: str = field(default="", metadata={"help": "client certificate (PEM) for mTLS"})
    client_tls_key: str = field(default="", metadata={"help": "private key (PEM) of --client-tls-cert"})
    model_cache_dir: str = field(default="", metadata={"help": "converted builtin models cache"})
    die_with_parent: bool = field(default=False, metadata={"help": "exit when the trainer process dies (local executor)"})
    processes: int = field(
        default=1,
        metadata={"help": "training processes: > 1 re-runs this worker under torch.distributed.run, one rank each"},
    )
    notify_fd: int = field(
        default=-1, metadata={"help": "pipe to the local trainer: each committed event's `<job key>:<sequence>` is written to it"}
    )
    rlaif_judge_chunk_size: int = field(
        default=16, metadata={"help": "RLAIF: verdicts per JUDGE progress event (and per cancel check)"}
    )
    stop_poll_seconds: float = field(
        default=1.0, metadata={"help": "how often the job's row is read for a cancel, pause, preemption or checkpoint request"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    trace_file: str = field(default="", metadata={"help": "write OpenTelemetry spans as JSON lines to this file"})
