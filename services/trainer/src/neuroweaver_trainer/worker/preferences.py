"""DPO and REWARD_MODEL: trained on prompt/chosen/rejected rows, in one stage (`dpo` or `reward_model`).

DPO trains a LoRA adapter; REWARD_MODEL a reward model (LoRA + score head on the job's base model). Both
resume from their checkpoints.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..domain.job import EventType, JobEvent, Method
from .events import numeric
from .training import JobFailed, Outcome, Training, effective


class PreferenceTraining(Training):
    async def train(self) -> Outcome:
        job = self.job
        stage = "dpo" if job.method is Method.DPO else "reward_model"
        await self.start_stage(stage, f"{job.method.value if job.method else ''} on {job.base_model}")
        base_dir = await self.base_dir()
        prefs = await self.input_file(job.dataset_uri, job.dataset_digest, "preference dataset")
        res = await self._run(stage, base_dir, prefs)
        if res.status != "completed":
            return Outcome("cancelled", f"cancelled at step {res.global_step} of stage {stage}; last checkpoint kept")
        if job.method is Method.DPO:
            fm = res.final_metrics
            metrics = numeric(
                {
                    "train_loss": res.train_loss,
                    "dpo_reward_accuracy": fm.get("rewards/accuracies"),
                    "dpo_reward_margin": fm.get("rewards/margins"),
                }
            )
            adapter, sha = res.adapter_dir, res.adapter_sha256
        else:
            metrics = numeric({"train_loss": res.train_loss, "reward_model_accuracy": res.accuracy, "reward_model_mean_margin": res.mean_margin,
                               "reward_model_eval_pairs": res.eval_pairs})  # fmt: skip
            adapter, sha = res.model_dir, res.model_sha256
        await self.journal.write(
            JobEvent(EventType.STAGE_COMPLETED, stage=stage, metrics=metrics, message=f"trained {res.global_step} steps"),
            current_step=res.global_step,
            metrics=metrics,
        )
        return Outcome("completed", f"{res.global_step} steps", adapter_dir=str(adapter), adapter_sha256=str(sha), report_path=res.report_path,
                       metrics=metrics, dataset_uri=job.dataset_uri, dataset_digest=job.dataset_digest)  # fmt: skip

    def common_settings(self) -> dict[str, Any]:
        h, lo = self.job.hyperparameters, self.job.lora
        return dict(
            learning_rate=h.learning_rate, num_epochs=h.num_epochs, max_steps=h.max_steps if h.max_steps > 0 else -1,
            batch_size=h.batch_size, grad_accumulation=h.gradient_accumulation_steps, max_length=h.max_seq_length,
            lora_r=lo.r, lora_alpha=lo.alpha, lora_dropout=effective(lo.dropout), seed=effective(h.seed), checkpoint_every_steps=h.checkpoint_every_steps,
        )  # fmt: skip

    def dpo_config(self, base_dir: str, prefs: str, out: str):
        """run_dpo's config: the job's stored settings (dpo_beta None: a job stored before the setting, so 0.1)."""
        from neuroweaver_ml.rlaif import DPOJobConfig

        job = self.job
        beta = job.hyperparameters.dpo_beta
        return DPOJobConfig(base_model_dir=base_dir, preference_file=prefs, output_dir=out, target_modules=list(job.lora.target_modules) or None,
                            beta=0.1 if beta is None else beta, base_model_ref=job.base_model, adapter_name=job.name, **self.common_settings())  # fmt: skip

    async def _run(self, stage: str, base_dir: str, prefs: str):
        from neuroweaver_ml import DatasetInvalid, ResumeMismatch
        from neuroweaver_ml.rlaif import RewardModelConfig, run_dpo, run_reward_model

        job = self.job
        h = job.hyperparameters
        out = self.job_dir() / stage
        common = self.common_settings()
        try:
            if job.method is Method.DPO:
                return await asyncio.to_thread(run_dpo, self.dpo_config(base_dir, prefs, str(out)), self.on_event, self.stop)
            eval_file = (
                await self.input_file(job.eval_dataset_uri, job.eval_dataset_digest, "eval preference dataset")
                if job.eval_dataset_uri
                else None
            )
            rm = RewardModelConfig(preference_file=prefs, output_dir=str(out), backbone="policy", base_model_dir=base_dir,
                                   eval_file=eval_file, eval_fraction=0.0 if eval_file else effective(h.eval_split), **common)  # fmt: skip
            return await asyncio.to_thread(run_reward_model, rm, self.on_event, self.stop)
        except (DatasetInvalid, ResumeMismatch) as exc:
            raise JobFailed(str(exc)) from None
        except ValueError as exc:
            raise JobFailed(f"invalid training configuration: {exc}") from None
        except MemoryError:
            raise JobFailed("out of memory: lower batch_size or max_seq_length") from None
