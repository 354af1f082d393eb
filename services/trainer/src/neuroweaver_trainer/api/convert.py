"""Protobuf ⇄ domain conversions for the trainer API."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.duration_pb2 import Duration

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.trainer.v1 import trainer_service_pb2 as svc
from neuroweaver.trainer.v1 import training_job_pb2 as pb
from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.timestamps import to_timestamp

from ..domain import job as d
from ..service.ports import DatasetPreview, LogChunk

_STATE = {
    d.JobState.QUEUED: pb.TrainingJob.STATE_QUEUED, d.JobState.RUNNING: pb.TrainingJob.STATE_RUNNING,
    d.JobState.SUCCEEDED: pb.TrainingJob.STATE_SUCCEEDED, d.JobState.FAILED: pb.TrainingJob.STATE_FAILED,
    d.JobState.CANCELLING: pb.TrainingJob.STATE_CANCELLING, d.JobState.CANCELLED: pb.TrainingJob.STATE_CANCELLED,
    d.JobState.PAUSING: pb.TrainingJob.STATE_PAUSING, d.JobState.PAUSED: pb.TrainingJob.STATE_PAUSED,
}  # fmt: skip
_METHOD = {
    d.Method.SFT_LORA: pb.TRAINING_METHOD_SFT_LORA, d.Method.SFT_QLORA: pb.TRAINING_METHOD_SFT_QLORA,
    d.Method.RLAIF: pb.TRAINING_METHOD_RLAIF, d.Method.DPO: pb.TRAINING_METHOD_DPO,
    d.Method.REWARD_MODEL: pb.TRAINING_METHOD_REWARD_MODEL, d.Method.EXPORT: pb.TRAINING_METHOD_EXPORT,
}  # fmt: skip
_EXPORT_FORMAT = {"merged": pb.EXPORT_FORMAT_MERGED, "gguf": pb.EXPORT_FORMAT_GGUF, "gguf-lora": pb.EXPORT_FORMAT_GGUF_LORA}
_EXPORT_FORMAT_FROM_PB = {v: k for k, v in _EXPORT_FORMAT.items()}
_METHOD_FROM_PB = {v: k for k, v in _METHOD.items()}
_EXECUTOR = {d.Executor.LOCAL: pb.EXECUTOR_LOCAL, d.Executor.KUBERNETES: pb.EXECUTOR_KUBERNETES}
_EXECUTOR_FROM_PB = {v: k for k, v in _EXECUTOR.items()}
_ALGORITHM = {
    "grpo": pb.RlaifConfig.POLICY_ALGORITHM_GRPO,
    "rloo": pb.RlaifConfig.POLICY_ALGORITHM_RLOO,
    "dpo": pb.RlaifConfig.POLICY_ALGORITHM_DPO,
}
_ALGORITHM_FROM_PB = {v: k for k, v in _ALGORITHM.items()}
_REWARD_SOURCE = {
    "reward_model": pb.RlaifConfig.REWARD_SOURCE_REWARD_MODEL, "judge": pb.RlaifConfig.REWARD_SOURCE_JUDGE,
    "both": pb.RlaifConfig.REWARD_SOURCE_BOTH,
}  # fmt: skip
_REWARD_SOURCE_FROM_PB = {v: k for k, v in _REWARD_SOURCE.items()}
_PRECISION = {"fp32": pb.PRECISION_FP32, "bf16": pb.PRECISION_BF16, "fp16": pb.PRECISION_FP16}
_PRECISION_FROM_PB = {v: k for k, v in _PRECISION.items()}
_EVENT = {t: pb.EventType.Value(f"EVENT_TYPE_{t.value}") for t in d.EventType}
# The domain keeps the bump as the word it stores (major, minor, patch); the wire carries the shared enum.
_VERSION_BUMP = {"major": cpb.VERSION_BUMP_MAJOR, "minor": cpb.VERSION_BUMP_MINOR, "patch": cpb.VERSION_BUMP_PATCH}
_VERSION_BUMP_FROM_PB = {v: k for k, v in _VERSION_BUMP.items()}


def _enum(value: int, enum_type, field: str) -> int:
    if value not in enum_type.values():
        raise InvalidArgument(f"{field} has unknown value {value}", field=field, reason="INVALID_ENUM")
    return value


def _present(m, new: str, old: str) -> Any:
    """A setting where 0 means something: the `optional` field when set, else the deprecated field it replaces (whose
    zero/false meant "unset"), else None (unset: apply_defaults fills in the documented default)."""
    if m.HasField(new):
        return getattr(m, new)
    return getattr(m, old) or None


def _both(new: str, old: str, value: Any) -> dict[str, Any]:
    """The effective value under the `optional` field and under the deprecated one (older clients read that)."""
    return {} if value is None else {new: value, old: value}


def _set(name: str, value: Any) -> dict[str, Any]:
    """An `optional` field set only when the setting has a value."""
    return {} if value is None else {name: value}


def job_from_pb(m: pb.TrainingJob) -> d.TrainingJob:
    _enum(m.method, pb.TrainingMethod, "training_job.method")
    _enum(m.executor, pb.Executor, "training_job.executor")
    _enum(m.rlaif.algorithm, pb.RlaifConfig.PolicyAlgorithm, "training_job.rlaif.algorithm")
    _enum(m.rlaif.reward_source, pb.RlaifConfig.RewardSource, "training_job.rlaif.reward_source")
    _enum(m.version_bump, cpb.VersionBump, "training_job.version_bump")
    _enum(m.export.format, pb.ExportFormat, "training_job.export.format")
    _enum(m.hyperparameters.precision, pb.Precision, "training_job.hyperparameters.precision")
    h, lo, r, rl = m.hyperparameters, m.lora, m.resources, m.rlaif
    return d.TrainingJob(
        export=d.ExportSettings(
            model_version=m.export.model_version, format=_EXPORT_FORMAT_FROM_PB.get(m.export.format, ""),
            quantization=m.export.quantization,
        ),
        tracking=d.TrackingSettings(
            mlflow_tracking_uri=m.tracking.mlflow_tracking_uri, mlflow_experiment=m.tracking.mlflow_experiment,
            tensorboard=m.tracking.tensorboard,
        ),
        rlaif=d.RlaifSettings(
            prompts_uri=rl.prompts_uri, eval_prompts_uri=rl.eval_prompts_uri, judge_version=rl.judge_version,
            candidates_per_prompt=rl.candidates_per_prompt, algorithm=_ALGORITHM_FROM_PB.get(rl.algorithm, ""),
            reward_source=_REWARD_SOURCE_FROM_PB.get(rl.reward_source, ""), reward_model_backbone=rl.reward_model_backbone,
            kl_coefficient=_present(rl, "kl_beta", "kl_coefficient"), policy_steps=rl.policy_steps,
            min_margin=_present(rl, "min_score_margin", "min_margin"), start_from_version=rl.start_from_version,
            max_new_tokens=rl.max_new_tokens, qlora=rl.qlora, policy_learning_rate=rl.policy_learning_rate,
        ),
        display_name=m.display_name, base_model=m.base_model, dataset_uri=m.dataset_uri, eval_dataset_uri=m.eval_dataset_uri,
        method=_METHOD_FROM_PB.get(m.method),
        lora=d.LoraSettings(
            r=lo.r, alpha=lo.alpha, dropout=_present(lo, "lora_dropout", "dropout"), target_modules=list(lo.target_modules),
        ),
        hyperparameters=d.Hyperparameters(
            learning_rate=h.learning_rate, num_epochs=h.num_epochs, max_steps=h.max_steps, batch_size=h.batch_size,
            gradient_accumulation_steps=h.gradient_accumulation_steps, max_seq_length=h.max_seq_length,
            warmup_ratio=_present(h, "warmup_fraction", "warmup_ratio"), weight_decay=h.weight_decay,
            seed=_present(h, "random_seed", "seed"), checkpoint_every_steps=h.checkpoint_every_steps,
            eval_every_steps=_present(h, "eval_interval_steps", "eval_every_steps"),
            gradient_checkpointing=_present(h, "use_gradient_checkpointing", "gradient_checkpointing"),
            eval_split=_present(h, "eval_fraction", "eval_split"), lr_scheduler=h.lr_scheduler,
            max_grad_norm=_present(h, "gradient_clip_norm", "max_grad_norm"), warmup_steps=h.warmup_steps,
            optimizer=h.optimizer, precision=_PRECISION_FROM_PB.get(h.precision, ""),
            sequence_packing=h.sequence_packing if h.HasField("sequence_packing") else None,
            train_on_inputs=h.train_on_inputs, dpo_beta=h.dpo_beta if h.HasField("dpo_beta") else None,
            early_stopping_patience=h.early_stopping_patience, chat_template=h.chat_template,
            liger_kernels=h.liger_kernels, offload_activations=h.offload_activations,
        ),
        executor=_EXECUTOR_FROM_PB.get(m.executor, d.Executor.LOCAL),
        resources=d.Resources(
            gpus=r.gpus, cpu=r.cpu, memory=r.memory, node_selector=dict(r.node_selector), image=r.image, processes=r.processes,
            tolerations=[{"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect} for t in r.tolerations],
        ),
        target_model=m.target_model, version_bump=_VERSION_BUMP_FROM_PB.get(m.version_bump, ""), labels=dict(m.labels),
        priority=m.priority,
    )  # fmt: skip


def job_to_pb(j: d.TrainingJob) -> pb.TrainingJob:
    h, lo, r, rl = j.hyperparameters, j.lora, j.resources, j.rlaif
    rlaif = None
    if j.method is d.Method.RLAIF or rl.configured:
        rlaif = pb.RlaifConfig(
            prompts_uri=rl.prompts_uri, eval_prompts_uri=rl.eval_prompts_uri, judge_version=rl.judge_version,
            candidates_per_prompt=rl.candidates_per_prompt, algorithm=_ALGORITHM.get(rl.algorithm, pb.RlaifConfig.POLICY_ALGORITHM_UNSPECIFIED),
            reward_source=_REWARD_SOURCE.get(rl.reward_source, pb.RlaifConfig.REWARD_SOURCE_UNSPECIFIED), reward_model_backbone=rl.reward_model_backbone,
            policy_steps=rl.policy_steps, start_from_version=rl.start_from_version, max_new_tokens=rl.max_new_tokens, qlora=rl.qlora,
            policy_learning_rate=rl.policy_learning_rate,
            **_both("kl_beta", "kl_coefficient", rl.kl_coefficient), **_both("min_score_margin", "min_margin", rl.min_margin),
        )  # fmt: skip
    export = None
    if j.export.configured:
        export = pb.ExportConfig(
            model_version=j.export.model_version, quantization=j.export.quantization,
            format=_EXPORT_FORMAT.get(j.export.format, pb.EXPORT_FORMAT_UNSPECIFIED),
        )  # fmt: skip
    return pb.TrainingJob(
        rlaif=rlaif,
        export=export,
        tracking=pb.Tracking(
            mlflow_tracking_uri=j.tracking.mlflow_tracking_uri, mlflow_experiment=j.tracking.mlflow_experiment,
            tensorboard=j.tracking.tensorboard,
        )
        if j.tracking.configured
        else None,
        name=j.name, display_name=j.display_name, base_model=j.base_model, dataset_uri=j.dataset_uri,
        eval_dataset_uri=j.eval_dataset_uri, method=_METHOD[j.method] if j.method else pb.TRAINING_METHOD_UNSPECIFIED,
        lora=pb.LoraConfig(r=lo.r, alpha=lo.alpha, target_modules=lo.target_modules, **_both("lora_dropout", "dropout", lo.dropout)),
        hyperparameters=pb.Hyperparameters(
            learning_rate=h.learning_rate, num_epochs=h.num_epochs, max_steps=h.max_steps, batch_size=h.batch_size,
            gradient_accumulation_steps=h.gradient_accumulation_steps, max_seq_length=h.max_seq_length,
            weight_decay=h.weight_decay, checkpoint_every_steps=h.checkpoint_every_steps, lr_scheduler=h.lr_scheduler,
            **_both("warmup_fraction", "warmup_ratio", h.warmup_ratio), **_both("random_seed", "seed", h.seed),
            **_both("eval_interval_steps", "eval_every_steps", h.eval_every_steps),
            **_both("use_gradient_checkpointing", "gradient_checkpointing", h.gradient_checkpointing),
            **_both("eval_fraction", "eval_split", h.eval_split), **_both("gradient_clip_norm", "max_grad_norm", h.max_grad_norm),
            warmup_steps=h.warmup_steps, optimizer=h.optimizer, precision=_PRECISION.get(h.precision, pb.PRECISION_UNSPECIFIED),
            train_on_inputs=h.train_on_inputs, **_set("sequence_packing", h.sequence_packing), **_set("dpo_beta", h.dpo_beta),
            early_stopping_patience=h.early_stopping_patience, chat_template=h.chat_template,
            liger_kernels=h.liger_kernels, offload_activations=h.offload_activations,
        ),
        executor=_EXECUTOR[j.executor],
        resources=pb.Resources(
            gpus=r.gpus, cpu=r.cpu, memory=r.memory, node_selector=r.node_selector, image=r.image, processes=r.processes,
            tolerations=[pb.Toleration(**t) for t in r.tolerations],
        ),
        target_model=j.target_model, version_bump=_VERSION_BUMP.get(j.version_bump, cpb.VERSION_BUMP_UNSPECIFIED), labels=j.labels,
        state=_STATE[j.state], stage=j.stage, error=j.error, model_version=j.model_version,
        output_uri=j.output_uri, dataset_digest=j.dataset_digest, current_step=j.current_step, total_steps=j.total_steps,
        resumed_from_step=j.resumed_from_step, attempts=j.attempts, metrics=j.metrics,
        create_time=to_timestamp(j.create_time), start_time=to_timestamp(j.start_time), end_time=to_timestamp(j.end_time),
        creator=j.creator, priority=j.priority, queue_position=j.queue_position, wait_reason=j.wait_reason,
    )  # fmt: skip


def event_to_pb(e: d.JobEvent) -> pb.TrainingJobEvent:
    out = pb.TrainingJobEvent(
        job=e.job, sequence=e.sequence, type=_EVENT[e.type], stage=e.stage, create_time=to_timestamp(e.create_time),
        state=_STATE[e.state] if e.state else pb.TrainingJob.STATE_UNSPECIFIED, metrics=e.metrics, message=e.message,
    )  # fmt: skip
    if e.step is not None:
        s = e.step
        out.step.CopyFrom(
            pb.StepMetrics(
                step=s.step,
                total_steps=s.total_steps,
                epoch=s.epoch,
                loss=s.loss,
                learning_rate=s.learning_rate,
                grad_norm=s.grad_norm,
                tokens_per_second=s.tokens_per_second,
                eta=Duration(seconds=int(s.eta_seconds)),
                rss_bytes=s.rss_bytes,
                gpu_memory_bytes=s.gpu_memory_bytes,
            )
        )
    return out


def method_from_pb(value: int, field: str) -> d.Method | None:
    """UNSPECIFIED → None; a number outside the enum is INVALID_ENUM."""
    return _METHOD_FROM_PB.get(pb.TrainingMethod.ValueType(_enum(value, pb.TrainingMethod, field)))


def preview_to_pb(p: DatasetPreview) -> svc.PreviewDatasetResponse:
    return svc.PreviewDatasetResponse(
        rows=[
            svc.DatasetRow(line=line, content=json_format.ParseDict(row, struct_pb2.Struct()), truncated=cut)
            for line, row, cut in p.rows
        ],
        row_count=p.row_count, format=p.format, sha256=p.sha256, size_bytes=p.size_bytes,
        problems=[svc.DatasetProblem(line=line or 0, message=message) for line, message in p.problems],
        problems_truncated=p.problems_truncated,
    )  # fmt: skip


def logs_to_pb(job: d.TrainingJob, attempt: int, chunk: LogChunk) -> svc.ReadTrainingJobLogsResponse:
    return svc.ReadTrainingJobLogsResponse(
        lines=chunk.lines, attempt=attempt, attempts=job.attempts, executor=_EXECUTOR[job.executor],
        truncated=chunk.truncated, next_offset=chunk.next_offset, state=_STATE[job.state],
    )  # fmt: skip
