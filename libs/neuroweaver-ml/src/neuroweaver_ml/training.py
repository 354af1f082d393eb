"""Supervised fine-tuning with LoRA / QLoRA on top of the transformers ``Trainer``.

``run_sft(config, on_event, should_stop)`` is meant to run inside a worker process. It:

* validates and tokenizes the dataset (chat template, loss on assistant tokens only);
* loads the base model (QLoRA: NF4 + double quantization through bitsandbytes, which also runs
  on CPU) and wraps it with a PEFT LoRA adapter on every attention/MLP projection;
* trains with padding-free batches (sequences concatenated with restarting ``position_ids``, which
  transformers turns into a block-diagonal causal mask) unless ``padding_free=False``;
* writes HF Trainer checkpoints (adapter + optimizer + scheduler + RNG + trainer state, which
  gives the data position) to ``output_dir/checkpoints`` and, when called again on the same
  ``output_dir`` with the same config, resumes from the newest *complete* checkpoint;
* polls ``should_stop()`` after every optimizer step and stops cleanly (status ``cancelled``);
* on success writes ``output_dir/adapter`` (adapter + tokenizer + model card, renamed into place
  atomically), ``output_dir/training_report.json`` and returns an :class:`SFTResult`.

Why the plain ``Trainer`` rather than TRL's ``SFTTrainer``: we need our own completion-only
masking that works with any prefix-stable chat template (SmolLM2's has no ``{% generation %}``
markers) and full control over resume; the Trainer gives checkpoints/resume for free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .artifacts import digest_path
from .control import after_step, is_main_process, local_rank, world_size
from .datasets import IGNORE_INDEX, load_rows, split_train_eval, tokenize_rows
from .errors import DatasetInvalid, ResumeMismatch
from .lora import find_lora_target_modules
from .tracking import attach_trackers

log = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
ADAPTER_DIRNAME = "adapter"
REPORT_FILENAME = "training_report.json"
RUN_CONFIG_FILENAME = "run_config.json"
_CHECKPOINT_REQUIRED = ("trainer_state.json", "adapter_config.json", "optimizer.pt", "scheduler.pt")


@dataclass
class SFTConfig:
    """Everything one SFT run needs. Paths are local paths (resolve URIs before)."""

    base_model_dir: str
    train_file: str
    output_dir: str
    eval_file: str | None = None
    eval_fraction: float = 0.0  # used only without eval_file; 0 → no evaluation
    dataset_format: str = "auto"  # auto | chat | prompt_completion
    method: Literal["lora", "qlora"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None → every attention/MLP projection (inspected)
    learning_rate: float = 2e-4
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = 4
    grad_accumulation: int = 1
    max_seq_length: int = 1024
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every_steps: int = 50  # 0 → only the final checkpoint at the end
    keep_checkpoints: int = 2
    eval_every_steps: int = 0  # 0 → evaluate once at the end (when there is eval data)
    gradient_checkpointing: bool = False
    completion_only_loss: bool = True
    padding_free: bool = True
    optim: str = ""  # transformers optimizer name; "" → paged_adamw_8bit on a GPU, adamw_torch without
    precision: str = "auto"  # auto (bf16 on a GPU, fp32 without) | fp32 | bf16 | fp16 (CUDA only)
    device: str = "auto"  # auto | cpu | cuda
    # Memory/speed on a CUDA GPU (refused elsewhere, before any work): Liger's Triton kernels for the model's family
    # (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy: no full logits tensor), applied by transformers'
    # ``use_liger_kernel``; TRL's activation offloading (saved activations to pinned CPU memory on a side stream;
    # with gradient_checkpointing only the checkpointed layer inputs are left to offload).
    liger_kernels: bool = False
    offload_activations: bool = False
    # > 0: stop once eval_loss has not improved for this many evaluations, and keep the best evaluation's weights as
    # the adapter (a checkpoint is saved at every evaluation then). Needs evaluation (eval data, eval_every_steps > 0).
    early_stopping_patience: int = 0
    chat_template: str | None = None  # Jinja chat template replacing the tokenizer's (saved with the adapter)
    base_model_ref: str | None = None  # how the base was referenced (for the model card / report)
    adapter_name: str | None = None  # for the model card

    def fingerprint_fields(self) -> dict[str, Any]:
        """Fields that determine the training trajectory; a resume must match them."""
        d = dataclasses.asdict(self)
        for k in (
            "output_dir",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "eval_every_steps",
            "base_model_ref",
            "adapter_name",
            "device",
            "train_file",
            "eval_file",
            "base_model_dir",
        ):
            d.pop(k)
        added_later = (
            ("optim", ""), ("precision", "auto"), ("liger_kernels", False), ("offload_activations", False),
            ("early_stopping_patience", 0), ("chat_template", None),
        )  # fmt: skip
        for k, default in added_later:  # older runs' fingerprints unchanged
            if d[k] == default:
                d.pop(k)
        return d


@dataclass
class StepEvent:
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_seen: int
    tokens_per_second: float
    eta_seconds: float | None
    rss_bytes: int
    gpu_memory_bytes: int | None
    kind: str = "step"


@dataclass
class EvalEvent:
    step: int
    eval_loss: float
    kind: str = "eval"


@dataclass
class CheckpointEvent:
    step: int
    path: str
    kind: str = "checkpoint"


@dataclass
class ResumedEvent:
    step: int
    path: str
    kind: str = "resumed"


Event = StepEvent | EvalEvent | CheckpointEvent | ResumedEvent


def event_to_dict(event: Event) -> dict[str, Any]:
    return dataclasses.asdict(event)


@dataclass
class SFTResult:
    status: Literal["completed", "cancelled"]
    output_dir: str
    adapter_dir: str | None
    adapter_sha256: str | None
    adapter_size_bytes: int | None
    train_loss: float | None  # mean training loss over the steps of this call
    final_step_loss: float | None  # loss logged at the last step
    eval_loss: float | None
    total_steps: int  # planned optimizer steps
    global_step: int  # steps done (== total_steps when completed)
    tokens_seen: int  # input tokens processed, including before a resume
    train_examples: int
    eval_examples: int
    resumed_from_step: int  # 0 when started fresh
    last_checkpoint: str | None
    runtime_seconds: float
    tokens_per_second: float  # over this call
    report_path: str | None
    dataset_sha256: str | None = None
    method: str = "lora"
    target_modules: list[str] = field(default_factory=list)
    best_step: int | None = None  # with early stopping: the evaluation whose weights the adapter holds
    stopped_early: bool = False  # early stopping ended the run before its planned steps


# ---------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_step(p: Path) -> int | None:
    try:
        return int(p.name.split("-", 1)[1]) if p.name.startswith("checkpoint-") else None
    except ValueError:
        return None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint counts only if all the files needed to resume exist and the state parses."""
    p = Path(path)
    if not all((p / f).is_file() for f in _CHECKPOINT_REQUIRED):
        return False
    if not any(p.glob("adapter_model.*")):
        return False
    try:
        json.loads((p / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint under ``output_dir/checkpoints``. Incomplete ones newer than it
    (a worker killed while saving) are deleted so that checkpoint rotation cannot pick them."""
    ckdir = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not ckdir.is_dir():
        return None
    cands = sorted(((s, p) for p in ckdir.iterdir() if p.is_dir() and (s := _checkpoint_step(p)) is not None), reverse=True)
    for _step, p in cands:
        if is_complete_checkpoint(p):
            return p
        log.warning("removing incomplete checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


# ---------------------------------------------------------------------------------------------
# data


class _ListDataset:
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class SFTCollator:
    """Padding-free: concatenate the batch into one row with restarting ``position_ids`` (the first
    label of every sequence is ignored so no token predicts across a boundary). Otherwise: right
    padding with ``attention_mask``."""

    def __init__(self, pad_token_id: int, padding_free: bool = True):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if self.padding_free:
            flat_ids, flat_labels, flat_pos = [], [], []
            for f in features:
                n = len(f["input_ids"])
                flat_ids += f["input_ids"]
                flat_labels += [IGNORE_INDEX] + list(f["labels"][1:])
                flat_pos += list(range(n))
            return {
                "input_ids": torch.tensor([flat_ids], dtype=torch.long),
                "labels": torch.tensor([flat_labels], dtype=torch.long),
                "position_ids": torch.tensor([flat_pos], dtype=torch.long),
            }
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# model


def _device(cfg: SFTConfig) -> str:
    import torch

    if cfg.device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{local_rank()}" if world_size() > 1 else "cuda"  # each rank on its own GPU
    return cfg.device


def _weights_dtype(cfg: SFTConfig, device: str):
    """The base's dtype (QLoRA: the compute dtype): bf16 on a GPU unless fp32/fp16 is asked for; fp32 without a GPU
    (bf16 there is autocast over fp32 weights)."""
    import torch

    on_gpu = device.startswith("cuda")
    if cfg.precision == "fp16":
        if not on_gpu:
            raise ValueError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
        return torch.float16
    if cfg.precision == "fp32" or not on_gpu:
        return torch.float32
    return torch.bfloat16


def _check_gpu_features(cfg: SFTConfig, device: str) -> None:
    """liger_kernels / offload_activations need a CUDA GPU and their package: refused up front, not silently ignored."""
    import importlib.util

    asked = [n for n in ("liger_kernels", "offload_activations") if getattr(cfg, n)]
    if asked and not device.startswith("cuda"):
        raise ValueError(f"{' and '.join(asked)} need a CUDA GPU (device here: {device}); turn them off on this device")
    if cfg.liger_kernels and importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("liger_kernels needs the liger-kernel package (pip install liger-kernel)")
    if cfg.offload_activations and importlib.util.find_spec("trl") is None:
        raise ValueError("offload_activations needs the trl package (its activation offloading is used)")


def _trainer_class(cfg: SFTConfig):
    """The transformers ``Trainer``, or with ``offload_activations`` one whose training step (forward + backward) runs
    inside TRL's activation-offloading context, as TRL's own SFTTrainer does."""
    from transformers import Trainer

    if not cfg.offload_activations:
        return Trainer
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    class _OffloadingTrainer(Trainer):
        def training_step(self, *args, **kwargs):
            if not hasattr(self, "_offload_ctx"):  # built on the final (PEFT) model: it finds the output head there
                self._offload_ctx = get_act_offloading_ctx_manager(model=self.model)
            with self._offload_ctx:
                return super().training_step(*args, **kwargs)

    return _OffloadingTrainer


def load_base_for_training(cfg: SFTConfig, device: str):
    """Load the base model for LoRA (full precision; bf16 on GPU) or QLoRA (NF4 4-bit)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _weights_dtype(cfg, device)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model_dir,
            quantization_config=bnb,
            dtype=dtype,
            device_map={"": device},
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if cfg.liger_kernels and dtype == torch.bfloat16:
            # prepare_model_for_kbit_training upcasts every weight that is not 4-bit to fp32. The frozen embeddings
            # and lm_head go back to bf16 (2 GB less at Llama-3's 128k vocabulary): Liger's fused linear
            # cross-entropy, under bf16 autocast, would otherwise cast the fp32 head anew for every chunk.
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    module.to(dtype)
    elif cfg.method == "lora":
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model_dir, dtype=dtype)
        model.to(device)  # type: ignore[arg-type]  # transformers wraps .to() (functools.wraps): its stub takes the str for self
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    else:
        raise ValueError(f"unknown method {cfg.method!r}; expected 'lora' or 'qlora'")
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------------------------------------
# callback


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


def _make_callback(on_event: Callable[[Event], None] | None, should_stop: Callable[[], bool] | None, checkpoints_dir: Path):
    import torch
    from transformers import TrainerCallback

    class _Bridge(TrainerCallback):
        def __init__(self):
            self.cancelled = False
            self.t0 = None
            self.step0 = 0
            self.tokens0 = 0
            self.last_loss: float | None = None
            self.last_eval: float | None = None

        def _emit(self, ev):
            if on_event is not None:
                on_event(ev)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()
            self.step0 = state.global_step
            self.tokens0 = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if after_step(should_stop, control):
                self.cancelled = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            elapsed = max(time.monotonic() - (self.t0 or time.monotonic()), 1e-9)
            done = state.global_step - self.step0
            tps = (state.num_input_tokens_seen - self.tokens0) / elapsed
            eta = (state.max_steps - state.global_step) * elapsed / done if done > 0 else None
            self.last_loss = float(logs["loss"])
            gpu = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
            self._emit(
                StepEvent(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=float(state.epoch or 0.0),
                    loss=self.last_loss,
                    learning_rate=_f(logs.get("learning_rate")),
                    grad_norm=_f(logs.get("grad_norm")),
                    tokens_seen=int(state.num_input_tokens_seen),
                    tokens_per_second=tps,
                    eta_seconds=eta,
                    rss_bytes=_rss_bytes(),
                    gpu_memory_bytes=gpu,
                )
            )

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and "eval_loss" in metrics:
                self.last_eval = float(metrics["eval_loss"])
                self._emit(EvalEvent(step=state.global_step, eval_loss=self.last_eval))

        def on_save(self, args, state, control, **kw):
            self._emit(CheckpointEvent(step=state.global_step, path=str(checkpoints_dir / f"checkpoint-{state.global_step}")))

    return _Bridge()


def _early_stopping(cfg: SFTConfig) -> list:
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)] if cfg.early_stopping_patience > 0 else []


def _f(v) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# run


def _fingerprint(cfg: SFTConfig, dataset_sha: str, eval_sha: str | None, base_sha: str) -> str:
    payload = {"config": cfg.fingerprint_fields(), "train": dataset_sha, "eval": eval_sha, "base": base_sha}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _base_identity(base_dir: str) -> str:
    """Cheap identity of a base checkpoint: its config.json plus weight file names and sizes."""
    p = Path(base_dir)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for w in sorted(p.glob("*.safetensors")):
        h.update(f"{w.name}:{w.stat().st_size}".encode())
    return h.hexdigest()


def sft_training_arguments(cfg: SFTConfig, ckdir: Path, has_eval: bool, device: str):
    """The transformers TrainingArguments of an SFT run: every setting of ``cfg`` as written (0 warmup, 0 clipping,
    seed 0 and ``eval_every_steps`` 0 — one evaluation at the end — included)."""
    from transformers import TrainingArguments

    on_gpu = device.startswith("cuda")
    early = cfg.early_stopping_patience > 0
    if early and not (has_eval and cfg.eval_every_steps > 0):
        raise ValueError("early_stopping_patience needs evaluation: eval data and eval_every_steps > 0")
    return TrainingArguments(
        output_dir=str(ckdir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accumulation,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if cfg.checkpoint_every_steps > 0 or early else "no",
        # with early stopping every evaluation is a checkpoint, so the best one can be restored at the end
        save_steps=cfg.eval_every_steps if early else cfg.checkpoint_every_steps if cfg.checkpoint_every_steps > 0 else 500,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        save_total_limit=max(1, cfg.keep_checkpoints),
        eval_strategy="steps" if (has_eval and cfg.eval_every_steps > 0) else "no",
        eval_steps=cfg.eval_every_steps if cfg.eval_every_steps > 0 else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu),
        fp16=cfg.precision == "fp16",
        use_cpu=not on_gpu,
        optim=cfg.optim or ("paged_adamw_8bit" if on_gpu else "adamw_torch"),
        report_to="none",
        use_liger_kernel=cfg.liger_kernels,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        include_num_input_tokens_seen="all" if cfg.padding_free else "non_padding",
        save_only_model=False,
    )


def run_sft(
    config: SFTConfig,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SFTResult:
    """Run (or resume, or return the already finished result of) one SFT job. See module docs.

    Raises ``DatasetInvalid`` for bad data, ``ResumeMismatch`` when ``output_dir`` holds a run with a
    different configuration, ``ValueError`` for a bad config.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, set_seed

    cfg = config
    t_start = time.monotonic()
    if cfg.method not in ("lora", "qlora"):
        raise ValueError(f"unknown method {cfg.method!r}; expected 'lora' or 'qlora'")
    if cfg.batch_size < 1 or cfg.grad_accumulation < 1 or cfg.max_seq_length < 2:
        raise ValueError("batch_size and grad_accumulation must be >= 1 and max_seq_length >= 2")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {cfg.precision!r}; expected auto, fp32, bf16 or fp16")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckdir = out / CHECKPOINTS_DIRNAME
    device = _device(cfg)
    _weights_dtype(cfg, device)  # fp16 without a GPU: refused before any work
    _check_gpu_features(cfg, device)

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model_dir)
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template  # tokenization, and the adapter's saved tokenizer, use it
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sft_formats = ("chat", "prompt_completion")
    fmt, rows = load_rows(cfg.train_file, cfg.dataset_format, allowed_formats=sft_formats)
    train_sha = digest_path(cfg.train_file)[0]
    eval_sha = None
    if cfg.eval_file:
        efmt, eval_rows = load_rows(cfg.eval_file, cfg.dataset_format, allowed_formats=sft_formats)
        if efmt != fmt:
            raise DatasetInvalid(cfg.eval_file, [f"eval dataset format {efmt!r} differs from train format {fmt!r}"])
        train_rows = rows
        eval_sha = digest_path(cfg.eval_file)[0]
    else:
        train_rows, eval_rows = split_train_eval(rows, cfg.eval_fraction, cfg.seed)
    train_tok = tokenize_rows(tokenizer, train_rows, fmt, cfg.max_seq_length, cfg.completion_only_loss)
    eval_tok = tokenize_rows(tokenizer, eval_rows, fmt, cfg.max_seq_length, cfg.completion_only_loss) if eval_rows else None
    if not train_tok.examples:
        raise DatasetInvalid(
            cfg.train_file, [f"no trainable rows left after tokenization/truncation (max_seq_length={cfg.max_seq_length})"]
        )

    fp = _fingerprint(cfg, train_sha, eval_sha, _base_identity(cfg.base_model_dir))
    run_cfg_path = out / RUN_CONFIG_FILENAME
    report_path = out / REPORT_FILENAME
    if run_cfg_path.is_file():
        prev = json.loads(run_cfg_path.read_text())
        if prev.get("fingerprint") != fp and (ckdir.is_dir() and any(ckdir.iterdir()) or report_path.is_file()):
            raise ResumeMismatch(
                f"{out} holds a run with a different configuration, dataset or base model; "
                "use a new output_dir (or delete this one) to start over"
            )
    # A finished run called again (e.g. worker restarted after finishing): return its result.
    if report_path.is_file():
        rep = json.loads(report_path.read_text())
        if rep.get("fingerprint") == fp and rep.get("result", {}).get("status") == "completed":
            res = SFTResult(**rep["result"])
            if res.adapter_dir and Path(res.adapter_dir).is_dir() and digest_path(res.adapter_dir)[0] == res.adapter_sha256:
                return res
    main = is_main_process()  # under torch.distributed.run every rank trains; rank 0 alone writes files
    if main:
        run_cfg_path.write_text(json.dumps({"fingerprint": fp, "config": dataclasses.asdict(cfg)}, indent=2))

    set_seed(cfg.seed)
    model = load_base_for_training(cfg, device)
    targets = list(cfg.target_modules) if cfg.target_modules else find_lora_target_modules(model)
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )

    eval_examples = eval_tok.examples if eval_tok is not None else []
    has_eval = bool(eval_examples)
    args = sft_training_arguments(cfg, ckdir, has_eval, device)
    bridge = _make_callback(on_event, should_stop, ckdir)
    trainer = _trainer_class(cfg)(
        model=model,
        args=args,
        data_collator=SFTCollator(tokenizer.pad_token_id, cfg.padding_free),
        train_dataset=_ListDataset(train_tok.examples),
        eval_dataset=_ListDataset(eval_examples) if has_eval else None,
        processing_class=tokenizer,
        callbacks=[bridge, *_early_stopping(cfg)],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # events go through on_event, not stdout
    trainer.remove_callback(ProgressCallback)
    attach_trackers(trainer, "sft")  # MLflow / TensorBoard when a tracking session is active (tracking.py)

    resume = find_resume_checkpoint(out)
    resumed_from = 0
    if resume is not None:
        resumed_from = json.loads((resume / "trainer_state.json").read_text()).get("global_step", 0)
        if on_event is not None:
            on_event(ResumedEvent(step=resumed_from, path=str(resume)))
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    last_ck = find_resume_checkpoint(out)
    runtime = time.monotonic() - t_start
    tokens_this_call = state.num_input_tokens_seen - bridge.tokens0
    train_elapsed = max(time.monotonic() - (bridge.t0 or t_start), 1e-9)

    common = dict(
        output_dir=str(out),
        train_loss=_f(train_out.training_loss) if state.global_step > resumed_from else None,
        final_step_loss=bridge.last_loss,
        total_steps=int(state.max_steps),
        global_step=int(state.global_step),
        tokens_seen=int(state.num_input_tokens_seen),
        train_examples=len(train_tok.examples),
        eval_examples=len(eval_examples),
        resumed_from_step=int(resumed_from),
        last_checkpoint=str(last_ck) if last_ck else None,
        runtime_seconds=round(runtime, 3),
        tokens_per_second=tokens_this_call / train_elapsed,
        dataset_sha256=train_sha,
        method=cfg.method,
        target_modules=targets,
    )
    if cfg.early_stopping_patience > 0 and state.best_global_step:
        common.update(
            best_step=int(state.best_global_step), stopped_early=not bridge.cancelled and state.global_step < state.max_steps
        )
    if bridge.cancelled and state.global_step < state.max_steps:
        return SFTResult(
            status="cancelled",
            adapter_dir=None,
            adapter_sha256=None,
            adapter_size_bytes=None,
            eval_loss=bridge.last_eval,
            report_path=None,
            **common,
        )

    eval_loss = bridge.last_eval
    if cfg.early_stopping_patience > 0 and state.best_metric is not None:
        eval_loss = _f(state.best_metric)  # the restored best weights' loss
    elif has_eval and (eval_loss is None or cfg.eval_every_steps <= 0 or state.global_step % cfg.eval_every_steps):
        eval_loss = _f(trainer.evaluate().get("eval_loss"))

    if not main:  # the adapter, model card and report are rank 0's
        return SFTResult(
            status="completed",
            adapter_dir=None,
            adapter_sha256=None,
            adapter_size_bytes=None,
            eval_loss=eval_loss,
            report_path=None,
            **common,
        )

    adapter_dir = out / ADAPTER_DIRNAME
    staging = out / f".{ADAPTER_DIRNAME}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    (staging / "README.md").write_text(_model_card(cfg, fmt, targets, state, train_out, eval_loss, train_tok))
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.rename(staging, adapter_dir)
    sha, size = digest_path(adapter_dir)
    result = SFTResult(
        status="completed",
        adapter_dir=str(adapter_dir),
        adapter_sha256=sha,
        adapter_size_bytes=size,
        eval_loss=eval_loss,
        report_path=str(report_path),
        **common,
    )
    report = {
        "fingerprint": fp,
        "result": dataclasses.asdict(result),
        "config": dataclasses.asdict(cfg),
        "dataset": {
            "format": fmt,
            "train_sha256": train_sha,
            "eval_sha256": eval_sha,
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "dropped_rows": train_tok.dropped,
            "truncated_rows": train_tok.truncated,
            "train_tokens_per_epoch": train_tok.num_tokens,
            "train_label_tokens_per_epoch": train_tok.num_label_tokens,
        },
        "device": device,
        "world_size": world_size(),
        "torch": torch.__version__,
        "log_history": state.log_history,
    }
    tmp_report = report_path.with_suffix(".json.tmp")
    tmp_report.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp_report, report_path)
    del trainer
    return result


def _model_card(cfg: SFTConfig, fmt: str, targets: list[str], state, train_out, eval_loss, tok) -> str:
    base = cfg.base_model_ref or cfg.base_model_dir
    name = cfg.adapter_name or Path(cfg.output_dir).name
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [neuroweaver, lora, sft" + (", qlora" if cfg.method == "qlora" else "") + "]",
        "---",
        "",
        f"# {name}",
        "",
        f"LoRA adapter trained by NeuroWeaver with supervised fine-tuning ({cfg.method.upper()}) on `{base}`.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {cfg.method}" + (" (NF4, double quantization)" if cfg.method == "qlora" else "") + " |",
        f"| LoRA r / alpha / dropout | {cfg.lora_r} / {cfg.lora_alpha} / {cfg.lora_dropout} |",
        f"| target modules | {', '.join(targets)} |",
        f"| learning rate | {cfg.learning_rate} ({cfg.lr_scheduler}) |",
        f"| steps | {state.global_step} (batch {cfg.batch_size} × accumulation {cfg.grad_accumulation}) |",
        f"| max sequence length | {cfg.max_seq_length} |",
        f"| dataset | {fmt}, {len(tok.examples)} training rows, sha256 of the training file in training_report.json |",
        f"| loss | {'assistant/completion tokens only' if cfg.completion_only_loss else 'all tokens'} |",
        f"| train loss | {train_out.training_loss:.4f} |" if train_out.training_loss is not None else "| train loss | n/a |",
        f"| eval loss | {eval_loss:.4f} |" if eval_loss is not None else "| eval loss | n/a |",
        f"| seed | {cfg.seed} |",
        "",
        "Load with `peft.PeftModel.from_pretrained(base_model, this_dir)` or",
        "`neuroweaver_ml.generation.load_for_inference(base_dir, adapter_dir)`.",
        "",
    ]
    return "\n".join(lines)
