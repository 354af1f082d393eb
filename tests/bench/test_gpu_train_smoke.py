"""bench/train/gpu.sh (the GPU QLoRA training bench, run by hand on a GPU machine) must not rot: its --tiny mode runs
the same flow on CPU (random base written, data generated, each cell in its own process through TRL's SFTTrainer and
our run_sft, the table written); its package check names what a bare Python lacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "train" / "gpu.sh"


@pytest.mark.slow
def test_tiny_mode_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    env.pop("OUT", None)
    proc = subprocess.run(
        [str(SCRIPT), "--tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--configs", "hf,ours",
         "--seqs", "64", "--warmup", "1", "--steps", "2"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Liger kernels and activation offloading need CUDA" in proc.stdout
    result = json.loads((out / "gpu_train.json").read_text())
    rows = {(r["config"], r["seq"]): r for r in result["rows"]}
    assert set(rows) == {("hf", 64), ("ours", 64)}
    for r in rows.values():  # every measured step trained on exactly `seq` tokens
        assert r["measured_steps"] == 2 and r["tokens"] == 2 * 64 and r["tok_s"] > 0, r
    table = (out / "gpu_train.md").read_text()
    assert table.startswith("## Training: GPU") and "| ours | 64 |" in table and "| hf | 64 |" in table


def test_check_names_the_missing_packages_and_the_download_command() -> None:
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no system python3 without torch")
    proc = subprocess.run(
        [str(SCRIPT), "--check-only"], env={**os.environ, "PYTHON": bare}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    missing = next(line for line in proc.stdout.splitlines() if line.startswith("MISSING Python packages:"))
    assert {"torch", "trl", "bitsandbytes", "liger-kernel"} <= set(missing.split())
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in proc.stdout
