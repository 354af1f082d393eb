"""Experiment trackers for training runs: MLflow (a tracking server) and TensorBoard event files.

A :class:`TrackingSession` is one job's run across all of its stages and attempts:

* **MLflow**: one run per job, created through ``MlflowClient`` (its id is kept in ``state_file``, so an attempt
  that resumes from a checkpoint continues the same run instead of starting a new one). Parameters are the job's
  settings (logged once); every stage's trainer logs ``<stage>/<name>`` metrics at its global step (``sft/loss``,
  ``reward_model/loss``, ``policy/reward`` ...), so the stages of an RLAIF job share the run without their step
  counters colliding; the caller adds final metrics and artifacts (report, adapter) and ends the run.
* **TensorBoard**: transformers' own ``TensorBoardCallback`` writing to ``<tensorboard_dir>/<stage>`` (one
  TensorBoard run per stage, its usual ``train/loss`` ... tags).

Why not ``TrainingArguments(report_to=["mlflow"])``: transformers' ``MLflowCallback`` is configured through
process-wide environment variables and mlflow's fluent (global) active run, logs every ``TrainingArguments`` field
as a parameter — MLflow parameters are immutable, so the second stage of a job (different learning rate) would
raise — and lets any tracker error propagate out of ``Trainer.train``. A tracker must never fail or slow down a
training: here every MLflow call runs on one background thread (a step only enqueues), and the first error turns
MLflow off for the rest of the attempt and is reported once through ``on_warning`` (the worker makes it a job
event). TensorBoard errors are caught the same way.

Trainers pick the active session up by themselves: the caller wraps the training in ``with activate(session):``
and each trainer calls :func:`attach_trackers` (no session: nothing happens).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
_BATCH = 100  # params per log_batch call (the REST API's limit)
_STOP = object()


@dataclass
class TrackingConfig:
    mlflow_tracking_uri: str = ""  # "" = no MLflow
    mlflow_experiment: str = "neuroweaver"
    run_name: str = ""
    tensorboard_dir: str = ""  # "" = no TensorBoard
    state_file: str = ""  # keeps the MLflow run id across attempts ("" = a new run each time)
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    stage_names: dict[str, str] = field(default_factory=dict)  # library stage → the name metrics carry
    flush_timeout_seconds: float = 30.0


class TrackingSession:
    """One job's trackers. Never raises: failures go to ``on_warning`` (once per tracker) and turn that tracker off."""

    def __init__(self, config: TrackingConfig, on_warning: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_warning = on_warning
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self.mlflow_error: str | None = None
        self.tensorboard_error: str | None = None
        self._client: Any = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._sender: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- MLflow ------------------------------------------------------------------------------------

    @property
    def mlflow_on(self) -> bool:
        return self.run_id is not None and self.mlflow_error is None

    def _mlflow_failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            if self.mlflow_error is not None:
                return
            self.mlflow_error = f"{what}: {type(exc).__name__}: {str(exc)[:300]}"
        log.warning("MLflow tracking off for this attempt (%s)", self.mlflow_error)
        if self.on_warning is not None:
            self.on_warning(
                f"MLflow at {self.config.mlflow_tracking_uri} failed ({self.mlflow_error}); "
                "training goes on without MLflow for this attempt"
            )

    def start(self) -> None:
        """Creates the MLflow run, or continues the one ``state_file`` names; logs the parameters of a new run."""
        cfg = self.config
        if not cfg.mlflow_tracking_uri:
            return
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
            previous = self._read_state()
            if previous is not None:
                run = client.get_run(previous)
                self.run_id, self.experiment_id, self.resumed = previous, run.info.experiment_id, True
                if run.info.status != "RUNNING":
                    client.update_run(previous, status="RUNNING")
            else:
                self.experiment_id = self._experiment(client, cfg.mlflow_experiment)
                run = client.create_run(self.experiment_id, run_name=cfg.run_name or None, tags=dict(cfg.tags))
                self.run_id = run.info.run_id
                params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(cfg.params.items())]
                for i in range(0, len(params), _BATCH):
                    client.log_batch(self.run_id, params=params[i : i + _BATCH])
                self._write_state()
            self._client = client
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the training
            self.run_id = None
            self._mlflow_failed("starting the run", exc)
            return
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()

    @staticmethod
    def _experiment(client, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:  # another job created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _read_state(self) -> str | None:
        path = self.config.state_file
        if not path or not Path(path).is_file():
            return None
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        if state.get("mlflow_tracking_uri") != self.config.mlflow_tracking_uri:
            return None  # another server: a new run there
        return state.get("run_id") or None

    def _write_state(self) -> None:
        path = self.config.state_file
        if not path:
            return
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        state = {
            "mlflow_tracking_uri": self.config.mlflow_tracking_uri,
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
        }
        tmp.write_text(json.dumps(state))
        os.replace(tmp, p)

    def _send_loop(self) -> None:
        """Sends queued metric batches in order; the training thread never waits on the network."""
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self.mlflow_on:
                    try:
                        self._client.log_batch(self.run_id, metrics=item)
                    except Exception as exc:  # noqa: BLE001
                        self._mlflow_failed("logging metrics", exc)
            finally:
                self._queue.task_done()

    def log_metrics(self, metrics: dict[str, float], step: int, stage: str = "") -> None:
        """Queues ``metrics`` (named ``<stage>/<name>`` when a stage is given) at ``step``; returns at once."""
        if not self.mlflow_on or not metrics:
            return
        from mlflow.entities import Metric

        prefix = f"{self.config.stage_names.get(stage, stage)}/" if stage else ""
        now = int(time.time() * 1000)
        self._queue.put([Metric(prefix + k, float(v), now, int(step)) for k, v in metrics.items()])

    def flush(self) -> None:
        """Waits (at most ``flush_timeout_seconds``) until the queued metrics are sent."""
        if self._sender is None:
            return
        deadline = time.monotonic() + self.config.flush_timeout_seconds
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_artifacts(self, items: list[tuple[str, str]]) -> None:
        """Uploads files or directories: (local path, artifact directory in the run)."""
        if not self.mlflow_on:
            return
        self.flush()
        for local, artifact_path in items:
            try:
                if Path(local).is_dir():
                    self._client.log_artifacts(self.run_id, local, artifact_path=artifact_path)
                else:
                    self._client.log_artifact(self.run_id, local, artifact_path=artifact_path or None)
            except Exception as exc:  # noqa: BLE001
                self._mlflow_failed(f"uploading {Path(local).name}", exc)
                return

    def finish(self, status: str = "FINISHED") -> None:
        """Sends what is queued and ends the run (FINISHED, FAILED or KILLED); stops the sender."""
        if self._sender is None:
            return
        self.flush()
        if self.mlflow_on:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as exc:  # noqa: BLE001
                self._mlflow_failed("ending the run", exc)
        self.close()

    def close(self) -> None:
        """Stops the sender without ending the run (a later attempt continues it)."""
        if self._sender is None:
            return
        self.flush()
        self._queue.put(_STOP)
        self._sender.join(timeout=5)
        self._sender = None

    # -- trainer callbacks -------------------------------------------------------------------------

    def callbacks(self, stage: str) -> list[Any]:
        """The transformers callbacks that log one stage's trainer."""
        out: list[Any] = []
        if self.mlflow_on:
            out.append(_mlflow_callback(self, stage))
        if self.config.tensorboard_dir and self.tensorboard_error is None:
            tb = _tensorboard_callback(self, stage)
            if tb is not None:
                out.append(tb)
        return out

    def tensorboard_failed(self, exc: BaseException) -> None:
        if self.tensorboard_error is not None:
            return
        self.tensorboard_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        log.warning("TensorBoard logging off for this attempt (%s)", self.tensorboard_error)
        if self.on_warning is not None:
            self.on_warning(
                f"TensorBoard event files could not be written ({self.tensorboard_error}); training goes on without them"
            )


def _numeric(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        if isinstance(v, bool):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f == f and f not in (float("inf"), float("-inf")):
            out[k] = f
    return out


def _mlflow_callback(session: TrackingSession, stage: str):
    from transformers import TrainerCallback

    class MlflowStageCallback(TrainerCallback):
        """Every logged value of the stage's trainer (loss, learning_rate, grad_norm, eval_loss, TRL's rewards ...)."""

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and state.is_world_process_zero:
                session.log_metrics(_numeric(logs), state.global_step, stage)

    return MlflowStageCallback()


def _tensorboard_callback(session: TrackingSession, stage: str):
    """transformers' TensorBoardCallback with its writer on ``<tensorboard_dir>/<stage>``; an error turns it off."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        name = session.config.stage_names.get(stage, stage)
        writer = SummaryWriter(log_dir=str(Path(session.config.tensorboard_dir) / name))
    except Exception as exc:  # noqa: BLE001 - tensorboard missing, directory not writable
        session.tensorboard_failed(exc)
        return None

    class SafeTensorBoardCallback(TensorBoardCallback):
        def _guard(self, fn, *a, **kw):
            if session.tensorboard_error is not None:
                return None
            try:
                return fn(*a, **kw)
            except Exception as exc:  # noqa: BLE001
                session.tensorboard_failed(exc)
                return None

        def on_train_begin(self, args, state, control, **kw):
            return self._guard(super().on_train_begin, args, state, control, **kw)

        def on_log(self, args, state, control, logs=None, **kw):
            return self._guard(super().on_log, args, state, control, logs=logs, **kw)

        def on_train_end(self, args, state, control, **kw):
            return self._guard(super().on_train_end, args, state, control, **kw)

    return SafeTensorBoardCallback(tb_writer=writer)


# -- the active session ------------------------------------------------------------------------------

_ACTIVE: ContextVar[TrackingSession | None] = ContextVar("neuroweaver_tracking", default=None)


def active_session() -> TrackingSession | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(session: TrackingSession | None) -> Iterator[TrackingSession | None]:
    """Trainers built inside (this thread, or threads started with ``asyncio.to_thread``) log to ``session``."""
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def attach_trackers(trainer, stage: str) -> None:
    """Adds the active session's callbacks for ``stage`` to a transformers/TRL trainer (none active: nothing)."""
    session = _ACTIVE.get()
    if session is None:
        return
    for cb in session.callbacks(stage):
        trainer.add_callback(cb)
