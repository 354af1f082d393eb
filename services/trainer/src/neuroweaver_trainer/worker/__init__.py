"""`python -m neuroweaver_trainer.worker --job projects/p/trainingJobs/j ...`: runs ONE training job.

Started by the trainer's scheduler as a subprocess (local executor) or as the container command of a
Kubernetes Job. It reads the job from the database, trains with neuroweaver_ml (checkpoints every N steps,
resuming from the newest complete checkpoint of an earlier attempt), writes every step/eval/checkpoint/stage
as a durable event (gap-free sequence, NOTIFY on PostgreSQL), stores the adapter, tokenizer, report and model
card in the artifact store, registers exactly one registry version (deterministic request_id) and writes the
final state. Every write is fenced by the attempt number, so a worker that lost its lease cannot write.

The job runs under a span whose parent is the traceparent stored at CreateTrainingJob, so training and the
registry's CreateModelVersion belong to the trace of the call that created the job (spans are exported only
with --trace-file; without one the trace id still propagates and appears in the JSON logs).

SIGTERM stops training after the current step: the job becomes CANCELLED when a cancel was requested,
otherwise (trainer shutdown) the worker exits with code 75 and the job is resumed later.

Modules, in the order a job meets them:
  config.py       the flags (WorkerConfig)
  lifecycle.py    the process: signals, die-with-parent, the attempt's lease, the job's trace span
  journal.py      fenced writes of events and job columns; the notify fd; the cancel watcher
  attempt.py      train → store → register → final state, and the exit code
  training.py     Training (SFT) and Outcome; rlaif.py and preferences.py for the other methods
  events.py       the table that maps neuroweaver_ml's training events to job events
  results.py      the artifact store (digest checked) and registration through adapters/registry.py
"""

from .config import WorkerConfig
from .lifecycle import main

__all__ = ["WorkerConfig", "main"]
