"""Shared test helpers: adapters, in-process model servers, waiting on conditions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path


def make_adapter(base_dir: Path, out_dir: Path, seed: int) -> tuple[Path, str]:
    """A LoRA adapter made with peft on the base (non-zero random B so it changes outputs), with its digest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from neuroweaver_ml import digest_path

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(out_dir))
    sha, _ = digest_path(out_dir)
    return out_dir, sha


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Polls a cheap in-process condition (never a fixed sleep): fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
