"""Helpers of the packaging tests: repo paths, the services' real facts, a small kustomize renderer.

(conftest.py puts this directory on sys.path; pytest runs with --import-mode=importlib.)
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu", "overlays/mtls", "overlays/tracing"]
SERVICES = ["registry", "trainer", "deployer", "experiments"]
METRICS_PORTS = {"registry": 9451, "trainer": 9452, "deployer": 9453, "experiments": 9454}


def grpc_service_names() -> dict[str, str]:
    """Fully-qualified gRPC service names, read from the generated descriptors (the contract)."""
    from neuroweaver.deployer.v1 import deployer_service_pb2
    from neuroweaver.experiments.v1 import experiments_service_pb2
    from neuroweaver.inference.v1 import inference_service_pb2
    from neuroweaver.registry.v1 import registry_service_pb2
    from neuroweaver.trainer.v1 import trainer_service_pb2

    out = {}
    for key, module in [
        ("registry", registry_service_pb2),
        ("trainer", trainer_service_pb2),
        ("deployer", deployer_service_pb2),
        ("experiments", experiments_service_pb2),
        ("model-server", inference_service_pb2),
    ]:
        (service,) = module.DESCRIPTOR.services_by_name.values()
        out[key] = service.full_name
    return out


def grpc_methods() -> dict[str, set[str]]:
    from neuroweaver.deployer.v1 import deployer_service_pb2
    from neuroweaver.experiments.v1 import experiments_service_pb2
    from neuroweaver.inference.v1 import inference_service_pb2
    from neuroweaver.registry.v1 import registry_service_pb2
    from neuroweaver.trainer.v1 import trainer_service_pb2

    out: dict[str, set[str]] = {}
    for module in (
        registry_service_pb2,
        trainer_service_pb2,
        deployer_service_pb2,
        experiments_service_pb2,
        inference_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            out[service.full_name] = {m.name for m in service.methods}
    return out


def default_ports() -> dict[str, int]:
    """The services' default gRPC ports as the SDK (and `make up`) dial them."""
    from neuroweaver_sdk.clients import DEFAULT_TARGETS

    return {name: int(target.rsplit(":", 1)[1]) for name, target in DEFAULT_TARGETS.items()}


def console_ports() -> dict[str, int]:
    """The web console's ports by the names the manifests give them: its own defaults, not a copy."""
    from neuroweaver_console.config import DEFAULT_METRICS_PORT, DEFAULT_PORT

    return {"http": DEFAULT_PORT, "http-metrics": DEFAULT_METRICS_PORT}


def config_fields() -> dict[str, set[str]]:
    """Settings each service really reads (its ServiceConfig dataclass fields), keyed by service; also the model
    server's and the console's."""
    import dataclasses
    import importlib

    out = {}
    for svc in SERVICES:
        module = importlib.import_module(f"neuroweaver_{svc}.app")
        (cls,) = [
            c
            for n, c in vars(module).items()
            if n.endswith("Config") and dataclasses.is_dataclass(c) and n.lower() == f"{svc}config"
        ]
        out[svc] = {f.name for f in dataclasses.fields(cls)}
    from neuroweaver_console.config import ConsoleConfig
    from neuroweaver_model_server.app import ModelServerConfig

    out["model_server"] = {f.name for f in dataclasses.fields(ModelServerConfig)}
    out["console"] = {f.name for f in dataclasses.fields(ConsoleConfig)}
    return out


def healthcheck(dockerfile: Path) -> list[str]:
    """The exec-form command of a Dockerfile's HEALTHCHECK (the last one, as Docker keeps)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    line = [x for x in text.splitlines() if x.strip().startswith("HEALTHCHECK")][-1]
    return json.loads(line.split(" CMD ", 1)[1].strip())


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- kustomize

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json_patch(obj: dict, ops: list[dict]) -> dict:
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "test":
            current = node[int(last)] if isinstance(node, list) else node[last]
            if current != op["value"]:
                raise AssertionError(f"patch test failed at {op['path']}: {current!r} != {op['value']!r}")
        elif kind in ("add", "replace"):
            if isinstance(node, list):
                if last == "-":
                    node.append(copy.deepcopy(op["value"]))
                elif kind == "add":
                    node.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    node[int(last)] = copy.deepcopy(op["value"])
            else:
                if kind == "replace" and last not in node:
                    raise AssertionError(f"replace of missing {op['path']}")
                node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise AssertionError(f"unsupported patch op {kind}")
    return obj


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    checks = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(target[k] == v for k, v in checks.items() if k in target)


def render(directory: Path) -> list[dict]:
    """Renders a kustomization using the features this repo uses: resources (files and directories),
    namespace, JSON 6902 `patches` (file with a target) and `images` (newName/newTag). Anything else fails."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
    unknown = set(kustomization) - known
    assert not unknown, f"{directory}: renderer does not implement {unknown}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else _load_docs(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, patch
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [i for i, o in enumerate(objects) if _matches(o, patch["target"])]
        assert hits, f"patch {patch['path']} matches nothing"
        for i in hits:
            objects[i] = _json_patch(objects[i], ops)
    for image in kustomization.get("images", []):
        for obj in objects:
            for c in _containers(obj):
                name, tag = _split_image(c["image"])
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def _split_image(image: str) -> tuple[str, str]:
    m = re.fullmatch(r"(.+?)(?::([^:/]+))?", image)
    assert m
    return m.group(1), m.group(2) or "latest"


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] != "Deployment":
        return []
    spec = obj["spec"]["template"]["spec"]
    return spec.get("containers", []) + spec.get("initContainers", [])


def kubectl() -> str | None:
    return shutil.which("kubectl")
