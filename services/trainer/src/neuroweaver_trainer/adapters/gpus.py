"""The GPUs a trainer replica hands to its local workers, from configuration or what the machine shows."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def parse_devices(text: str) -> list[str]:
    """`0,1,3` → ["0", "1", "3"]; `none` → []. Raises ValueError on anything but distinct indices or UUIDs."""
    if text.strip().lower() == "none":
        return []
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        if not (d.isdigit() or d.startswith(("GPU-", "MIG-"))):
            raise ValueError(f"GPU device {d!r} is not an index (0, 1, …) or a GPU-/MIG- UUID")
    if len(set(devices)) != len(devices):
        raise ValueError(f"GPU devices {text!r} name a device twice")
    return devices


def detect_devices() -> list[str]:
    """This process's CUDA_VISIBLE_DEVICES when set, else the GPUs nvidia-smi lists, else the driver's /proc entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return parse_devices(visible) if visible.strip() else []
    if smi := shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip().isdigit()]
        except (OSError, subprocess.SubprocessError):
            pass
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []
