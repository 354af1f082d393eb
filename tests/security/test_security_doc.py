"""SECURITY.md stays true: its RPC table is what the code declares, and every test it cites exists."""

from __future__ import annotations

import re

import security_doc

DOC = security_doc.Path(__file__).resolve().parents[2] / "SECURITY.md"


def test_the_rpc_table_is_generated_from_method_roles():
    text = DOC.read_text()
    start, end = text.find(security_doc.BEGIN), text.find(security_doc.END)
    assert start >= 0 and end > start, "SECURITY.md lost its generated table markers"
    current = text[start : end + len(security_doc.END)]
    assert current == security_doc.block(), "regenerate the table: python tests/security/security_doc.py"


def test_every_test_named_in_security_md_exists():
    root = DOC.parent
    cited = re.findall(r"`([\w./-]+\.py)::(test_\w+)`", DOC.read_text())
    assert len(cited) >= 30, "the OWASP mapping should cite the tests that cover each item"
    missing = [
        f"{path}::{name}"
        for path, name in cited
        if not (root / path).is_file() or not re.search(rf"^(async )?def {name}\(", (root / path).read_text(), re.M)
    ]
    assert not missing, f"SECURITY.md cites tests that do not exist: {missing}"
