import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat_rows(n: int = 40):
    rows = []
    for i in range(n):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        rows.append({"messages": [
            {"role": "system", "content": "You are a service advisor."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a 512-token BPE tokenizer and ChatML template."""
    from neuroweaver_ml.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the default cache (or $NW_TEST_MODEL_CACHE)."""
    from neuroweaver_ml.models import ensure_builtin

    return ensure_builtin("smollm2-135m-instruct", os.environ.get("NW_TEST_MODEL_CACHE"))
