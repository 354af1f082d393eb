"""Preference-data trainers: reward models (TRL RewardTrainer) and DPO (TRL DPOTrainer) on a LoRA policy.

``run_reward_model(RewardModelConfig)`` and ``run_dpo(DPOJobConfig)`` take a preference JSONL
(``prompt``/``chosen``/``rejected``) directly (jobs with method REWARD_MODEL / DPO); the RLAIF
pipeline calls them on its judge-ranked pairs. Both checkpoint with the HF Trainer under
``output_dir/checkpoints`` and resume from the newest complete checkpoint when called again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..artifacts import digest_path
from ..control import after_step
from ..datasets import load_rows, split_train_eval
from ..tracking import attach_trackers
from ..training import CheckpointEvent, ResumedEvent, _checkpoint_step, _f
from .events import MetricsEvent, RLStepEvent

log = logging.getLogger(__name__)

POLICY_BACKBONE = "policy"


# ---------------------------------------------------------------------------------------------
# shared helpers


def text_of(x: Any) -> str:
    """Plain text of a prompt/response that may be a string or a list of chat messages."""
    if isinstance(x, str):
        return x
    if isinstance(x, list):
        return "\n".join(str(m.get("content", "")) for m in x if isinstance(m, dict))
    return "" if x is None else str(x)


def prompt_text(x: Any) -> str:
    """The user's question: a string prompt, or the last user message of a conversation."""
    if isinstance(x, list):
        users = [m for m in x if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]["content"]) if users else text_of(x)
    return text_of(x)


def as_messages(prompt: Any, system_prompt: str | None = None) -> list[dict]:
    if isinstance(prompt, list):
        return prompt
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": str(prompt)}]


def reward_text(prompt: Any, response: Any) -> str:
    """How reward models see a (prompt, response) pair, in training and when scoring."""
    return f"Question: {prompt_text(prompt)}\nAnswer: {text_of(response)}"


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _find_resume(ckdir: Path, required: Sequence[str]) -> Path | None:
    if not ckdir.is_dir():
        return None
    cands = sorted(((s, p) for p in ckdir.iterdir() if p.is_dir() and (s := _checkpoint_step(p)) is not None), reverse=True)
    for _s, p in cands:
        ok = all((p / f).is_file() for f in required) and (p / "trainer_state.json").is_file()
        if ok:
            try:
                json.loads((p / "trainer_state.json").read_text())
                return p
            except ValueError:
                pass
        log.warning("removing incomplete checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def make_stage_callback(stage: str, on_event: Callable | None, should_stop: Callable[[], bool] | None, ckdir: Path):
    """HF TrainerCallback → RLStepEvent / CheckpointEvent; polls should_stop after every step."""
    from transformers import TrainerCallback

    class _Bridge(TrainerCallback):
        def __init__(self):
            self.cancelled = False
            self.last_logs: dict[str, float] = {}
            self.history: list[dict[str, float]] = []

        def on_step_end(self, args, state, control, **kw):
            if after_step(should_stop, control):
                self.cancelled = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            metrics = {k: v for k, v in ((k, _f(v)) for k, v in logs.items()) if v is not None}
            self.last_logs = metrics
            self.history.append({"step": state.global_step, **metrics})
            if on_event is not None:
                reward = metrics.get("reward", metrics.get("rewards/margins"))
                on_event(
                    RLStepEvent(
                        stage=stage,
                        step=state.global_step,
                        total_steps=state.max_steps,
                        loss=metrics.get("loss"),
                        reward=reward,
                        kl=metrics.get("kl"),
                        learning_rate=metrics.get("learning_rate"),
                        metrics=metrics,
                    )
                )

        def on_save(self, args, state, control, **kw):
            if on_event is not None:
                on_event(CheckpointEvent(step=state.global_step, path=str(ckdir / f"checkpoint-{state.global_step}")))

    return _Bridge()


def _quiet(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _common_args(
    out_ckdir: Path,
    *,
    device: str,
    seed: int,
    learning_rate: float,
    batch_size: int,
    grad_accumulation: int,
    max_steps: int,
    num_epochs: float,
    checkpoint_every_steps: int,
    keep_checkpoints: int,
) -> dict[str, Any]:
    on_gpu = device.startswith("cuda")
    return dict(
        output_dir=str(out_ckdir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accumulation,
        learning_rate=learning_rate,
        num_train_epochs=num_epochs,
        max_steps=max_steps if max_steps > 0 else -1,
        logging_steps=1,
        save_strategy="steps" if checkpoint_every_steps > 0 else "no",
        save_steps=checkpoint_every_steps if checkpoint_every_steps > 0 else 500,
        save_total_limit=max(1, keep_checkpoints),
        seed=seed,
        data_seed=seed,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        gradient_checkpointing=False,
    )


def _stage_args(cfg: RewardModelConfig | DPOJobConfig, ckdir: Path, device: str) -> dict[str, Any]:
    """`_common_args` from a stage config's own training fields."""
    return _common_args(
        ckdir,
        device=device,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        grad_accumulation=cfg.grad_accumulation,
        max_steps=cfg.max_steps,
        num_epochs=cfg.num_epochs,
        checkpoint_every_steps=cfg.checkpoint_every_steps,
        keep_checkpoints=cfg.keep_checkpoints,
    )


def load_preference_rows(path: str) -> list[dict]:
    _fmt, rows = load_rows(path, "preference")
    return rows


# ---------------------------------------------------------------------------------------------
# reward model


@dataclass
class RewardModelConfig:
    """Train a scalar reward model on preference pairs (TRL RewardTrainer, Bradley-Terry loss).

    ``backbone``: "" → all-MiniLM-L6-v2 (sequence classification, 1 label, fully fine-tuned);
    ``"policy"`` → a LoRA (+ trained score head) on ``base_model_dir`` as a sequence classifier;
    any other value → a local encoder directory."""

    preference_file: str
    output_dir: str
    backbone: str = ""
    base_model_dir: str | None = None  # needed for backbone "policy"
    eval_file: str | None = None
    eval_fraction: float = 0.2  # held-out pairs for accuracy when there is no eval_file
    learning_rate: float = 5e-5
    num_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accumulation: int = 1
    max_length: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 42
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 1
    device: str = "auto"


@dataclass
class RewardModelResult:
    status: Literal["completed", "cancelled"]
    output_dir: str
    model_dir: str | None  # output_dir/model: the reward model (or LoRA adapter + score head) + tokenizer
    backbone: str
    accuracy: float | None  # held-out pairwise accuracy: P(r(chosen) > r(rejected))
    mean_margin: float | None  # held-out mean r(chosen) - r(rejected)
    train_pairs: int
    eval_pairs: int
    global_step: int
    train_loss: float | None
    resumed_from_step: int
    model_sha256: str | None = None
    report_path: str | None = None
    runtime_seconds: float = 0.0


class RewardScorer:
    """Loads a trained reward model directory and scores (prompt, response) pairs."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", max_length: int = 256, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        md = Path(model_dir)
        meta = json.loads((md / "reward_model.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(md))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        if meta.get("peft"):
            from peft import PeftModel

            base = AutoModelForSequenceClassification.from_pretrained(meta["base_model_dir"], num_labels=1)
            base.config.pad_token_id = self.tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, str(md))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(md), num_labels=1)
        self.model = model.to(device).eval()
        self.device = device
        self.max_length = meta.get("max_length", max_length)
        self.batch_size = batch_size
        self._torch = torch

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        torch = self._torch
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
        return self.score_texts([reward_text(p, r) for p, r in zip(prompts, responses, strict=True)])


def pairwise_accuracy(scorer: RewardScorer, rows: Sequence[dict]) -> tuple[float | None, float | None]:
    if not rows:
        return None, None
    c = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    r_ = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    acc = sum(1.0 for a, b in zip(c, r_, strict=True) if a > b) / len(rows)
    margin = sum(a - b for a, b in zip(c, r_, strict=True)) / len(rows)
    return acc, margin


def run_reward_model(
    config: RewardModelConfig,
    on_event: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    stage: str = "reward_model",
) -> RewardModelResult:
    """Train (or resume, or return the finished result of) a reward model. See :class:`RewardModelConfig`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    from .judges import minilm_model_dir

    cfg = config
    t0 = time.monotonic()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "reward_model_report.json"
    if report_path.is_file():
        rep = json.loads(report_path.read_text())
        if rep.get("config") == dataclasses.asdict(cfg) and rep["result"]["status"] == "completed":
            return RewardModelResult(**rep["result"])
    device = _device(cfg.device)
    rows = load_preference_rows(cfg.preference_file)
    if cfg.eval_file:
        train_rows, eval_rows = rows, load_preference_rows(cfg.eval_file)
    else:
        train_rows, eval_rows = split_train_eval(rows, cfg.eval_fraction, cfg.seed) if len(rows) >= 4 else (rows, [])
    set_seed(cfg.seed)
    use_peft = cfg.backbone == POLICY_BACKBONE
    if use_peft:
        if not cfg.base_model_dir:
            raise ValueError("reward model backbone 'policy' needs base_model_dir")
        src = Path(cfg.base_model_dir)
    else:
        src = minilm_model_dir() if not cfg.backbone else Path(cfg.backbone)
    tok = AutoTokenizer.from_pretrained(str(src))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    eos = tok.eos_token or tok.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    peft_config = None
    if use_peft:
        from peft import LoraConfig

        from ..lora import find_lora_target_modules

        targets = [t for t in find_lora_target_modules(model) if t != "score"]
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="SEQ_CLS",
            modules_to_save=["score"],
        )

    def ds(rs):
        return Dataset.from_list(
            [{"chosen": reward_text(r["prompt"], r["chosen"]), "rejected": reward_text(r["prompt"], r["rejected"])} for r in rs]
        )

    ckdir = out / "checkpoints"
    args = RewardConfig(
        max_length=cfg.max_length,
        eos_token=eos,
        **_stage_args(cfg, ckdir, device),
    )
    bridge = make_stage_callback(stage, on_event, should_stop, ckdir)
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=ds(train_rows), processing_class=tok, peft_config=peft_config, callbacks=[bridge]
    )
    _quiet(trainer)
    attach_trackers(trainer, stage)
    resume = _find_resume(ckdir, ("adapter_config.json",) if use_peft else ("model.safetensors",))
    resumed_from = 0
    if resume is not None:
        resumed_from = json.loads((resume / "trainer_state.json").read_text()).get("global_step", 0)
        if on_event is not None:
            on_event(ResumedEvent(step=resumed_from, path=str(resume)))
    tout = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    common: dict[str, Any] = dict(
        output_dir=str(out),
        backbone=cfg.backbone or "all-minilm-l6-v2",
        train_pairs=len(train_rows),
        eval_pairs=len(eval_rows),
        global_step=int(state.global_step),
        train_loss=_f(tout.training_loss),
        resumed_from_step=int(resumed_from),
    )
    if bridge.cancelled and state.global_step < state.max_steps:
        return RewardModelResult(
            status="cancelled", model_dir=None, accuracy=None, mean_margin=None, runtime_seconds=time.monotonic() - t0, **common
        )
    model_dir = out / "model"
    staging = out / ".model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))  # type: ignore[union-attr,operator]  # Trainer.model: PreTrainedModel | nn.Module | None
    tok.save_pretrained(str(staging))
    atomic_write_json(
        staging / "reward_model.json",
        {
            "peft": use_peft,
            "base_model_dir": str(src) if use_peft else None,
            "backbone": common["backbone"],
            "max_length": cfg.max_length,
            "input_format": "Question: {prompt}\\nAnswer: {response}",
        },
    )
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.rename(staging, model_dir)
    del trainer
    scorer = RewardScorer(model_dir, device=device, max_length=cfg.max_length)
    acc, margin = pairwise_accuracy(scorer, eval_rows)
    if on_event is not None:
        on_event(
            MetricsEvent(
                stage=stage, metrics={"reward_model_accuracy": acc, "reward_model_margin": margin, "eval_pairs": len(eval_rows)}
            )
        )
    sha, _ = digest_path(model_dir)
    result = RewardModelResult(
        status="completed",
        model_dir=str(model_dir),
        accuracy=acc,
        mean_margin=margin,
        model_sha256=sha,
        report_path=str(report_path),
        runtime_seconds=round(time.monotonic() - t0, 3),
        **common,
    )
    atomic_write_json(
        report_path, {"config": dataclasses.asdict(cfg), "result": dataclasses.asdict(result), "log_history": state.log_history}
    )
    return result


# ---------------------------------------------------------------------------------------------
# LoRA policy (DPO here; GRPO / RLOO in pipeline.py)


@dataclass
class PolicyLoraSettings:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None


def load_policy(
    base_model_dir: str, parent_adapter_dir: str | None, lora: PolicyLoraSettings, device: str, *, quantize_4bit: bool = False
):
    """(model, peft_config): with a parent adapter the policy continues training it (TRL keeps a frozen
    copy as the "ref" adapter, so the KL/DPO reference is the parent); otherwise a fresh LoRA on the
    base (reference: the base with adapters disabled). ``quantize_4bit``: the base is loaded in 4-bit NF4
    with double quantization (QLoRA, as SFT's ``method="qlora"``); the LoRA weights stay in full precision."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from ..lora import find_lora_target_modules

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if quantize_4bit:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            base_model_dir, quantization_config=bnb, dtype=dtype, device_map={"": device}
        )
        # the policy stages train without gradient checkpointing (_common_args): short generations, small batches
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype).to(device)  # type: ignore[arg-type]  # transformers wraps .to() (functools.wraps): its stub takes the str for self
    if parent_adapter_dir:
        return PeftModel.from_pretrained(model, parent_adapter_dir, is_trainable=True), None
    targets = list(lora.target_modules) if lora.target_modules else find_lora_target_modules(model)
    return model, LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def save_policy_adapter(model, tokenizer, out: Path, card: str) -> tuple[str, str, int]:
    """Save only the trained "default" adapter (not TRL's frozen "ref" copy) + tokenizer, atomically."""
    adapter_dir = out / "adapter"
    staging = out / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), selected_adapters=["default"])
    tokenizer.save_pretrained(str(staging))
    (staging / "README.md").write_text(card)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.rename(staging, adapter_dir)
    sha, size = digest_path(adapter_dir)
    return str(adapter_dir), sha, size


@dataclass
class DPOJobConfig:
    """DPO on preference pairs with a LoRA policy (TRL DPOTrainer). ``parent_adapter_dir`` (an SFT
    adapter) is continued and is the DPO reference; without it a fresh LoRA on the base is trained."""

    base_model_dir: str
    preference_file: str
    output_dir: str
    parent_adapter_dir: str | None = None
    system_prompt: str | None = None  # for string prompts on chat models
    beta: float = 0.1
    learning_rate: float = 5e-5
    num_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 2
    grad_accumulation: int = 1
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    seed: int = 42
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    device: str = "auto"
    base_model_ref: str | None = None
    adapter_name: str | None = None
    quantize_4bit: bool = False  # QLoRA: the policy's base in 4-bit NF4


@dataclass
class PolicyResult:
    status: Literal["completed", "cancelled"]
    output_dir: str
    algorithm: str
    adapter_dir: str | None
    adapter_sha256: str | None
    adapter_size_bytes: int | None
    global_step: int
    total_steps: int
    resumed_from_step: int
    train_loss: float | None
    final_metrics: dict[str, float] = field(default_factory=dict)  # last logged step (loss, reward, kl, ...)
    report_path: str | None = None
    runtime_seconds: float = 0.0


def _chat_rows(rows: Sequence[dict], tokenizer, system_prompt: str | None) -> list[dict]:
    chat = bool(getattr(tokenizer, "chat_template", None))
    out: list[dict[str, Any]] = []
    for r in rows:
        if chat:
            out.append(
                {
                    "prompt": as_messages(r["prompt"], system_prompt),
                    "chosen": r["chosen"] if isinstance(r["chosen"], list) else [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": r["rejected"]
                    if isinstance(r["rejected"], list)
                    else [{"role": "assistant", "content": r["rejected"]}],
                }
            )
        else:
            out.append({"prompt": text_of(r["prompt"]), "chosen": text_of(r["chosen"]), "rejected": text_of(r["rejected"])})
    return out


def run_dpo(
    config: DPOJobConfig,
    on_event: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    stage: str = "policy",
) -> PolicyResult:
    """DPO (or resume it, or return the finished result). Output: ``output_dir/adapter`` +
    ``output_dir/policy_report.json``; checkpoints in ``output_dir/checkpoints``."""
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    cfg = config
    t0 = time.monotonic()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "policy_report.json"
    if report_path.is_file():
        rep = json.loads(report_path.read_text())
        if rep.get("config") == dataclasses.asdict(cfg) and rep["result"]["status"] == "completed":
            return PolicyResult(**rep["result"])
    device = _device(cfg.device)
    rows = load_preference_rows(cfg.preference_file)
    set_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.parent_adapter_dir or cfg.base_model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model, peft_config = load_policy(
        cfg.base_model_dir,
        cfg.parent_adapter_dir,
        PolicyLoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules),
        device,
        quantize_4bit=cfg.quantize_4bit,
    )
    ckdir = out / "checkpoints"
    args = DPOConfig(
        beta=cfg.beta,
        max_length=cfg.max_length,
        **_stage_args(cfg, ckdir, device),
    )
    bridge = make_stage_callback(stage, on_event, should_stop, ckdir)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_chat_rows(rows, tok, cfg.system_prompt)),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[bridge],
    )
    _quiet(trainer)
    attach_trackers(trainer, stage)
    return _finish_policy_training(
        trainer,
        bridge,
        tok,
        out,
        ckdir,
        "dpo",
        dataclasses.asdict(cfg),
        on_event,
        t0,
        _card(
            "DPO",
            cfg.base_model_ref or cfg.base_model_dir,
            cfg.adapter_name or out.name,
            cfg.parent_adapter_dir,
            {"beta": cfg.beta, "pairs": len(rows), "base": "4-bit NF4 (QLoRA)" if cfg.quantize_4bit else "full precision"},
        ),
    )


def _finish_policy_training(
    trainer, bridge, tok, out: Path, ckdir: Path, algorithm: str, cfg_dict: dict, on_event, t0: float, card: str
) -> PolicyResult:
    report_path = out / "policy_report.json"
    resume = _find_resume(ckdir, ("adapter_config.json", "optimizer.pt", "scheduler.pt"))
    resumed_from = 0
    if resume is not None:
        resumed_from = json.loads((resume / "trainer_state.json").read_text()).get("global_step", 0)
        if on_event is not None:
            on_event(ResumedEvent(step=resumed_from, path=str(resume)))
    tout = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    common = dict(
        output_dir=str(out),
        algorithm=algorithm,
        global_step=int(state.global_step),
        total_steps=int(state.max_steps),
        resumed_from_step=int(resumed_from),
        train_loss=_f(tout.training_loss) if state.global_step > resumed_from else None,
        final_metrics=bridge.last_logs,
    )
    if bridge.cancelled and state.global_step < state.max_steps:
        return PolicyResult(
            status="cancelled",
            adapter_dir=None,
            adapter_sha256=None,
            adapter_size_bytes=None,
            runtime_seconds=round(time.monotonic() - t0, 3),
            **common,
        )
    adapter_dir, sha, size = save_policy_adapter(trainer.model, tok, out, card)
    result = PolicyResult(
        status="completed",
        adapter_dir=adapter_dir,
        adapter_sha256=sha,
        adapter_size_bytes=size,
        report_path=str(report_path),
        runtime_seconds=round(time.monotonic() - t0, 3),
        **common,
    )
    atomic_write_json(report_path, {"config": cfg_dict, "result": dataclasses.asdict(result), "log_history": state.log_history})
    return result


def _card(method: str, base: str, name: str, parent: str | None, extra: dict[str, Any]) -> str:
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        f"tags: [neuroweaver, lora, {method.lower()}]",
        "---",
        "",
        f"# {name}",
        "",
        f"LoRA adapter trained by NeuroWeaver with {method} on `{base}`"
        + (f", starting from the adapter `{parent}`." if parent else "."),
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in extra.items()]
    lines += ["", "Load with `neuroweaver_ml.generation.load_for_inference(base_dir, adapter_dir)`.", ""]
    return "\n".join(lines)
