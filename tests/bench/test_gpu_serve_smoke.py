"""bench/serve/gpu.sh (the GPU serving bench, run by hand on a GPU machine) must not rot: its CPU smoke mode runs
the same flow (random base + two LoRA adapters, a real model server, the openai client at several concurrencies,
the tables written) with a tiny model; its package check names what a bare Python lacks."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "serve" / "gpu.sh"


@pytest.mark.slow
def test_smoke_mode_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    env.pop("OUT", None)
    proc = subprocess.run(
        [str(SCRIPT), "--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--concurrency", "1,4"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_serve.json").read_text())
    rows = {(r["system"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {(s, c) for s in ("ours vllm", "vllm serve", "ours transformers") for c in (1, 4)}
    for c in (1, 4):
        r = rows[("ours transformers", c)]
        assert r["tokens"] > 0 and r["tok_s"] > 0 and 0 < r["ttft"] <= r["p50"] <= r["p99"]
    table = (out / "gpu_serve.md").read_text()
    assert table.startswith("## Serving: GPU") and "| ours transformers | 4 |" in table
    if importlib.util.find_spec("vllm") is None:
        assert "vLLM is NOT installed" in proc.stdout
        assert rows[("vllm serve", 1)]["skipped"] == "not run: vLLM not installed"
        assert "| vllm serve | 1 | — |" in table


def test_check_names_the_missing_packages_and_the_download_command() -> None:
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no system python3 without torch")
    proc = subprocess.run(
        [str(SCRIPT), "--check-only"], env={**os.environ, "PYTHON": bare}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    missing = next(line for line in proc.stdout.splitlines() if line.startswith("MISSING Python packages:"))
    assert "torch" in missing.split() and "grpcio" in missing.split()
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in proc.stdout
