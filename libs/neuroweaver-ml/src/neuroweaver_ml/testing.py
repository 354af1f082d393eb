"""Small data builders shared by tests (importable: test modules cannot import conftest under importlib mode)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat_rows(n: int = 40):
    rows = []
    for i in range(n):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a service advisor."},
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
            }
        )
    return rows


def make_lora_adapter(base_dir: Path, out_dir: Path, seed: int) -> tuple[Path, str]:
    """A LoRA adapter made with peft on the base (non-zero random B so it changes outputs), with its digest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .artifacts import digest_path

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(out_dir))
    sha, _ = digest_path(out_dir)
    return out_dir, sha
