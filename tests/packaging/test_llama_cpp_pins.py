"""llama-cpp-python is pinned in requirements.txt; the export's converter scripts come from the sdist of that same
version (neuroweaver_ml.export, the trainer image). Every copy of the version must agree."""

import re
from pathlib import Path

from neuroweaver_ml import export

ROOT = Path(__file__).resolve().parents[2]


def _pin() -> str:
    match = re.search(r"^llama-cpp-python==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert match, "requirements.txt no longer pins llama-cpp-python"
    return match.group(1)


def test_export_tools_version_is_the_pinned_one():
    assert export.LLAMA_CPP_PYTHON_VERSION == _pin()


def test_trainer_image_fetches_the_pinned_sdist():
    dockerfile = (ROOT / "deploy/docker/trainer.Dockerfile").read_text()
    versions = set(re.findall(r"llama[-_]cpp[-_]python(?:==|-)(\d+\.\d+\.\d+)", dockerfile))
    assert versions == {_pin()}, versions


def test_model_server_package_pins_the_same_llama_cpp_python():
    """The llama.cpp engine's runtime library: the model server's package (what its image installs) pins the same."""
    pyproject = (ROOT / "services/model-server/pyproject.toml").read_text()
    assert re.findall(r'"llama-cpp-python==([^"]+)"', pyproject) == [_pin()]
    dockerfile = (ROOT / "deploy/docker/model-server.Dockerfile").read_text()
    assert "cmake" in dockerfile and "libgomp1" in dockerfile  # it compiles from the sdist; OpenMP at run time
