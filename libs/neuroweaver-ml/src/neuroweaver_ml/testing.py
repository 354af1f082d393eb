"""Small data builders shared by tests (importable: test modules cannot import conftest under importlib mode)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
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


def make_gguf_lora(
    base_gguf: Path, out_file: Path, *, seed: int = 0, rank: int = 4, alpha: float = 8.0, std: float = 0.05, zero: bool = False
) -> tuple[Path, str]:
    """A LoRA adapter for a Llama-architecture GGUF base written directly as a GGUF LoRA (llama.cpp's adapter format:
    `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, `<weight>.lora_a` [r, in] and `.lora_b`
    [out, r] for every attn_q/attn_v of the base), random A and B (`zero`: B = 0, an adapter that changes nothing),
    with its sha256."""
    import gguf
    import numpy as np

    from .artifacts import digest_path

    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(str(base_gguf))
    writer = gguf.GGUFWriter(str(out_file), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for t in reader.tensors:
        if not t.name.endswith((".attn_q.weight", ".attn_v.weight")):
            continue
        n_in, n_out = int(t.shape[0]), int(t.shape[1])
        a = rng.normal(0.0, std, size=(rank, n_in)).astype(np.float32)
        b = np.zeros((n_out, rank), np.float32) if zero else rng.normal(0.0, std, size=(n_out, rank)).astype(np.float32)
        writer.add_tensor(f"{t.name}.lora_a", a)
        writer.add_tensor(f"{t.name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    sha, _ = digest_path(out_file)
    return out_file, sha


@contextlib.contextmanager
def mlflow_server(root: Path, timeout: float = 120.0) -> Iterator[str]:
    """A real MLflow tracking server (`mlflow server`, the venv's) on a free port with a SQLite backend store and an
    artifact root under `root`; yields its URI and stops it (and its uvicorn workers) on exit."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
                time.sleep(0.3)
            yield uri
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers (their own process group)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
