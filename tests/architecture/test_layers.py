"""The layers hold across services: domain packages load no gRPC, production code never imports test helpers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["registry", "trainer", "deployer", "experiments", "model_server"]

# Imports the domain package and every module in it, then lists what of gRPC got loaded.
_IMPORT_DOMAIN = """
import importlib, pkgutil, sys
name = sys.argv[1]
package = importlib.import_module(name)
modules = [m.name for m in pkgutil.walk_packages(package.__path__, name + ".")]
for module in modules:
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m == "grpc" or m.startswith("grpc."))
assert modules, "no modules found in " + name
assert not loaded, f"{name} loads {loaded[:5]}"
"""


@pytest.mark.parametrize("service", SERVICES)
def test_domain_packages_load_no_grpc(service):
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_DOMAIN, f"neuroweaver_{service}.domain"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (and `module.name` for from-imports); relative ones keep their dots (`..adapters`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_test_helper(module: str) -> bool:
    parts = module.split(".")
    return parts[0].startswith("neuroweaver_") and parts[1:2] == ["testing"]  # neuroweaver_runtime.testing, ...


def _is_test_helper_source(path: Path) -> bool:
    """A test helper itself: a `testing.py` module or a module of a `testing` package (the kube stand-in)."""
    return path.name == "testing.py" or "testing" in path.parent.parts[-1:]


def test_production_code_never_imports_test_helpers():
    sources = sorted(ROOT.glob("libs/*/src/**/*.py")) + sorted(ROOT.glob("services/*/src/**/*.py"))
    assert len(sources) > 50
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources
        if not _is_test_helper_source(path) and any(_is_test_helper(m) for m in _imported_modules(path))
    ]
    assert not offenders, offenders


# What use cases and domain may not import: storage, wire formats, and the adapters that hide them behind ports.
_BELOW_THE_PORTS = {"sqlalchemy", "asyncpg", "grpc", "google", "aiohttp", "neuroweaver_kube"}


@pytest.mark.parametrize("service", ["registry", "trainer", "deployer", "experiments"])
def test_use_cases_and_domain_reach_storage_only_through_ports(service):
    """service/ and domain/ import no SQLAlchemy, gRPC, protobuf or adapters: the unit of work and the repositories
    (service/ports.py) are their only way to storage and to other services."""
    package = ROOT / "services" / service / "src" / f"neuroweaver_{service}"
    checked = sorted((package / "service").glob("*.py")) + sorted((package / "domain").glob("*.py"))
    assert len(checked) >= 6
    for path in checked:
        bad = {
            name
            for name in _imported_modules(path)
            if name.split(".")[0] in _BELOW_THE_PORTS
            or name.lstrip(".").startswith("adapters")
            or name.startswith("neuroweaver.")
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
