"""A job's experiment trackers around its training: `Tracked` wraps a method's `Training` (`Training.for_job` does).

Before training: the MLflow run is created, or the one an earlier attempt recorded in `<job dir>/tracking.json` is
continued (a job re-claimed after a crash, a preemption or a pause logs into the same run), and a LOG event names
the run and the TensorBoard directory. While training: `neuroweaver_ml.tracking` hooks every stage's trainer.
After a completed training: the final metrics, the training report, the adapter and the method's other outputs are
logged to the run, which ends FINISHED (FAILED when the training failed, KILLED when it was cancelled; a paused,
preempted or interrupted job leaves it open for the attempt that resumes it); the TensorBoard files go to the artifact store with
the adapter. Tracker failures are LOG events ("... training goes on"), never the job's failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..domain.job import EventType, JobEvent, JobState, Method
from .journal import Fenced
from .training import Training

if TYPE_CHECKING:
    from neuroweaver_ml.tracking import TrackingSession

    from .training import Outcome

TRACKING_STATE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
# MLflow's REST client retries 7 times with exponential backoff and a 120 s timeout by default: minutes of a
# stalled worker when the server is down. The job's trackers answer fast or are skipped; operators may override.
_MLFLOW_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif value is not None and value != "" and value != [] and value != {}:
        out[prefix] = ",".join(map(str, value)) if isinstance(value, list) else value


def job_params(training: Training) -> dict[str, Any]:
    """The MLflow parameters of a job: what it trains and its effective settings."""
    job = training.job
    params: dict[str, Any] = {}
    _flat("", {
        "job": job.name, "method": job.method.value if job.method else "", "base_model": job.base_model,
        "dataset_uri": job.dataset_uri, "dataset_sha256": job.dataset_digest, "eval_dataset_uri": job.eval_dataset_uri,
        "target_model": job.target_model, "lora": dataclasses.asdict(job.lora),
        "hyperparameters": dataclasses.asdict(job.hyperparameters),
    }, params)  # fmt: skip
    if job.method is Method.RLAIF:
        rl = dataclasses.asdict(job.rlaif)
        rl.pop("judge", None)  # the judge's endpoint settings; judge_version names it
        _flat("rlaif", rl, params)
    return params


class Tracked(Training):
    """A method's `Training` whose run is logged to the job's trackers (built only when the job has some)."""

    def __init__(self, inner: Training) -> None:
        super().__init__(inner.cfg, inner.job, inner.journal, inner.stop)
        self.inner = inner
        self.session: TrackingSession | None = None

    def _warn(self, message: str) -> None:
        """From a training or sender thread: a LOG event, committed before training goes on."""
        self.inner.journal.write_from_thread(JobEvent(EventType.LOG, stage=self._stage(), message=f"tracking: {message}"))

    def _stage(self) -> str:
        """The running stage; before the first one starts, the stage the method begins with."""
        first = {Method.DPO: "dpo", Method.REWARD_MODEL: "reward_model"}.get(self.job.method, "sft")  # type: ignore[arg-type]
        return self.job.stage or first

    async def train(self) -> Outcome:
        from neuroweaver_ml.tracking import TrackingConfig, TrackingSession, activate

        inner, job, t = self.inner, self.job, self.job.tracking
        job_dir = inner.job_dir()
        tb_dir = job_dir / TENSORBOARD_DIR if t.tensorboard else None
        for k, v in _MLFLOW_ENV.items():
            os.environ.setdefault(k, v)
        config = TrackingConfig(
            mlflow_tracking_uri=t.mlflow_tracking_uri, mlflow_experiment=t.mlflow_experiment or "neuroweaver",
            run_name=job.job_id, tensorboard_dir=str(tb_dir or ""), state_file=str(job_dir / TRACKING_STATE),
            params=job_params(inner), tags={"neuroweaver.job": job.name, "neuroweaver.target_model": job.target_model},
            # the preference trainer reports a DPO job's steps as `policy`; the job's stage is `dpo`
            stage_names={"policy": "dpo"} if job.method is Method.DPO else {},
        )  # fmt: skip
        session = self.session = TrackingSession(config, on_warning=self._warn)
        await asyncio.to_thread(session.start)
        await inner.journal.write(JobEvent(EventType.LOG, stage=self._stage(), message=self._describe(session, tb_dir)))
        try:
            with activate(session):
                outcome = await inner.train()
        except Fenced:  # another worker owns the job now: its attempt continues the run
            await asyncio.to_thread(session.close)
            raise
        except Exception:  # the job fails (attempt.py records why)
            await asyncio.to_thread(session.finish, "FAILED")
            raise
        except BaseException:  # shut down mid-attempt: the job resumes later
            await asyncio.to_thread(session.close)
            raise
        if outcome.status != "completed":
            current = await inner.journal.controls()
            if current is not None and current.state is JobState.CANCELLING:
                await asyncio.to_thread(session.finish, "KILLED")  # cancelled: no attempt will continue the run
            else:
                await asyncio.to_thread(session.close)  # paused, preempted, shut down: the resumed attempt continues it
            return outcome
        if tb_dir is not None and tb_dir.is_dir():
            outcome.extra_artifacts.append((str(tb_dir), TENSORBOARD_DIR))
        await asyncio.to_thread(self._finish, session, outcome)
        return outcome

    @staticmethod
    def _finish(session: TrackingSession, outcome: Outcome) -> None:
        session.log_metrics(outcome.metrics, step=0)
        items = [(outcome.adapter_dir, "adapter")]
        if outcome.report_path:
            items.append((outcome.report_path, ""))
        items += [(path, "") for path, name in outcome.extra_artifacts if name != TENSORBOARD_DIR]
        session.log_artifacts([(p, a) for p, a in items if p and Path(p).exists()])
        session.finish("FINISHED")

    def _describe(self, session: TrackingSession, tb_dir: Path | None) -> str:
        t, parts = self.job.tracking, []
        if t.mlflow_tracking_uri:
            if session.run_id:
                how = "continues" if session.resumed else "logs to"
                parts.append(
                    f"MLflow: {how} run {session.run_id} (experiment {t.mlflow_experiment!r}, id {session.experiment_id}) at {t.mlflow_tracking_uri}"
                )
            else:
                parts.append(f"MLflow: off for this attempt ({session.mlflow_error})")
        if tb_dir is not None:
            parts.append(f"TensorBoard: event files in {tb_dir} (tensorboard --logdir {tb_dir})")
        return "tracking: " + "; ".join(parts)
