"""Kubernetes building blocks shared by the trainer's and the deployer's Kubernetes backends.

- :mod:`neuroweaver_kube.manifests`: pure manifest builders (model server, training Job, YAML).
- :mod:`neuroweaver_kube.metrics`: metric names the model server exports and the alerts query.
- :mod:`neuroweaver_kube.client`: async client (server-side apply, status, scale, delete, Jobs).
- :mod:`neuroweaver_kube.testing`: a local stand-in of the Kubernetes API for tests.

The names below load their module on first use (PEP 562): `neuroweaver_kube.metrics` alone, which every model
server imports, must not import the kubernetes client (~0.3 s of its cold start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuroweaver_kube.client import DeploymentStatus, JobStatus, KubeApiError, KubeClient, KubeNotFound
    from neuroweaver_kube.manifests import (
        ModelServerSpec,
        Resources,
        SecretEnv,
        TrainingJobSpec,
        model_server_manifests,
        to_yaml,
        training_job,
    )

_MODULE_OF = {
    **dict.fromkeys(("DeploymentStatus", "JobStatus", "KubeApiError", "KubeClient", "KubeNotFound"), "client"),
    **dict.fromkeys(("ModelServerSpec", "Resources", "SecretEnv", "TrainingJobSpec"), "manifests"),
    **dict.fromkeys(("model_server_manifests", "to_yaml", "training_job"), "manifests"),
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'neuroweaver_kube' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"neuroweaver_kube.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DeploymentStatus",
    "JobStatus",
    "KubeApiError",
    "KubeClient",
    "KubeNotFound",
    "ModelServerSpec",
    "Resources",
    "SecretEnv",
    "TrainingJobSpec",
    "model_server_manifests",
    "to_yaml",
    "training_job",
]
