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
