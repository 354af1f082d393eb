import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from neuroweaver_ml.testing import chat_rows, write_jsonl  # noqa: F401  (re-exported for fixtures)


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
