"""RLAIF: stage `sft` (unless the job starts from a registered version), then run_rlaif's stages."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..domain.job import EventType, JobEvent
from .events import numeric
from .training import JobFailed, Outcome, Training, effective, sft_cancel_message, sft_metrics


class RlaifTraining(Training):
    async def train(self) -> Outcome:
        """generate, judge, pairs, reward_model, policy, evaluate, all under the job's directory so that a re-claimed
        job resumes where the last attempt stopped."""
        from neuroweaver_ml.rlaif import JudgeConfig, JudgeConfigError

        job = self.job
        r = job.rlaif
        metrics: dict[str, float] = {}
        if r.start_from_version:
            parent_dir = await self._parent_adapter()
        else:
            sft = await self.sft_stage()
            if sft.status == "cancelled":
                return Outcome("cancelled", "sft: " + sft_cancel_message(sft))
            parent_dir, metrics = Path(sft.adapter_dir), sft_metrics(sft)
        base_dir = await self.base_dir()
        prompts = await self.input_file(r.prompts_uri, r.prompts_digest, "prompt file")
        eval_prompts = (
            await self.input_file(r.eval_prompts_uri, r.eval_prompts_digest, "eval prompt file") if r.eval_prompts_uri else None
        )
        try:
            judge = JudgeConfig(**r.judge)
        except (JudgeConfigError, TypeError) as exc:
            raise JobFailed(f"judge version {r.judge_version} is not usable: {exc}") from None
        cfg = self.rlaif_config(base_dir, prompts, eval_prompts, str(parent_dir), judge)
        # the policy stage's STAGE_STARTED message says how it trains
        self.events.running.notes["policy"] = f"{r.algorithm}: LoRA on the " + (
            "base quantized to 4-bit NF4 (QLoRA)" if cfg.quantize_4bit else "full-precision base"
        )
        result = await self._run(cfg)
        if result.status == "cancelled":
            return Outcome("cancelled", f"cancelled in stage {self.events.stage}; completed stages and checkpoints kept")
        metrics.update(numeric(result.metrics))
        metrics["judge_errors"] = float(result.judge_errors)
        out = Path(result.output_dir)
        return Outcome(
            "completed", f"{result.policy.global_step if result.policy else 0} policy steps ({result.algorithm}), "
            f"{result.judged} verdicts by {result.judge_version}", adapter_dir=str(result.adapter_dir),
            adapter_sha256=str(result.adapter_sha256), report_path=result.report_path, metrics=metrics,
            extra_artifacts=[(str(out / n), n) for n in ("preferences.jsonl", "evaluation.json") if (out / n).is_file()],
            parent_version=r.start_from_version, judge_version=result.judge_version,
            dataset_uri=job.dataset_uri or r.prompts_uri, dataset_digest=job.dataset_digest or r.prompts_digest,
        )  # fmt: skip

    def rlaif_config(self, base_dir: str, prompts: str, eval_prompts: str | None, parent_dir: str, judge):
        """run_rlaif's config: the job's stored (effective) settings, zeros included, as written."""
        from neuroweaver_ml.rlaif import RlaifConfig

        job = self.job
        r, h, lo = job.rlaif, job.hyperparameters, job.lora
        return RlaifConfig(
            base_model_dir=base_dir, prompts_file=prompts, output_dir=str(self.job_dir() / "rlaif"), judge=judge,
            eval_prompts_file=eval_prompts, parent_adapter_dir=parent_dir, candidates_per_prompt=r.candidates_per_prompt,
            algorithm=r.algorithm, reward_source=r.reward_source, reward_model_backbone=r.reward_model_backbone,  # type: ignore[arg-type]
            # the reward model is trained when the policy uses it, and for DPO (its held-out pairwise accuracy on
            # the judge's pairs is reported); GRPO/RLOO rewarded by the judge alone skip the stage
            train_reward_model=r.algorithm == "dpo" or r.reward_source != "judge",
            kl_coefficient=effective(r.kl_coefficient), policy_steps=r.policy_steps, min_margin=effective(r.min_margin),
            max_new_tokens=r.max_new_tokens, judge_chunk_size=max(1, self.cfg.rlaif_judge_chunk_size),
            max_length=h.max_seq_length, lora_r=lo.r, lora_alpha=lo.alpha, lora_dropout=effective(lo.dropout),
            target_modules=list(lo.target_modules) or None, checkpoint_every_steps=h.checkpoint_every_steps,
            seed=effective(h.seed), base_model_ref=job.base_model, adapter_name=job.name, quantize_4bit=r.qlora,
            learning_rate=r.policy_learning_rate or 1e-5,  # 0: a job stored before the setting existed
        )  # fmt: skip

    async def _parent_adapter(self) -> Path:
        """The registered adapter the job starts from, checked against its registered sha256 (SFT is skipped)."""
        from neuroweaver_ml import DigestMismatch, uri_to_path, verify_digest

        r = self.job.rlaif
        parent_dir = uri_to_path(r.parent_artifact_uri)
        try:
            await asyncio.to_thread(verify_digest, parent_dir, r.parent_artifact_sha256)
        except DigestMismatch as exc:
            raise JobFailed(
                f"the adapter of {r.start_from_version} at {r.parent_artifact_uri} does not match its registered sha256: {exc}"
            ) from None
        except OSError as exc:
            raise JobFailed(f"the adapter of {r.start_from_version} cannot be read at {r.parent_artifact_uri}: {exc}") from None
        await self.journal.write(
            JobEvent(
                EventType.LOG,
                stage="sft",
                message=f"attempt {self.journal.attempt}: SFT skipped; starting from {r.start_from_version} ({r.parent_artifact_uri})",
            )
        )
        return parent_dir

    async def _run(self, cfg):
        from neuroweaver_ml import DatasetInvalid, ResumeMismatch
        from neuroweaver_ml.rlaif import JudgeConfigError, run_rlaif

        self.events.stage = "generate"
        try:
            return await asyncio.to_thread(run_rlaif, cfg, self.on_event, self.stop)
        except (DatasetInvalid, ResumeMismatch, JudgeConfigError) as exc:
            raise JobFailed(str(exc)) from None
        except ValueError as exc:
            raise JobFailed(f"RLAIF cannot continue: {exc}") from None
        except MemoryError:
            raise JobFailed("out of memory: lower max_new_tokens, candidates_per_prompt or max_seq_length") from None
