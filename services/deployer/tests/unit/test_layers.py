"""The layers stay apart: use cases, the controller, the alias follower and the domain reach storage, the registry,
the backends and the manifests only through the ports (service/ports.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import neuroweaver_deployer

PACKAGE = Path(neuroweaver_deployer.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_use_cases_and_domain_import_no_storage_and_no_protobuf():
    checked = sorted((PACKAGE / "service").glob("*.py")) + sorted((PACKAGE / "domain").glob("*.py"))
    assert len(checked) >= 6
    for path in checked:
        bad = {
            name
            for name in _imports(path)
            if name.split(".")[0] in {"sqlalchemy", "grpc", "google", "asyncpg", "neuroweaver_kube", "aiohttp"}
            or name.lstrip(".").startswith("adapters")
            or name.startswith("neuroweaver.")
        }
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
