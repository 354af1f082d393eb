"""Kubernetes building blocks shared by the trainer's and the deployer's Kubernetes backends.

- :mod:`neuroweaver_kube.manifests`: pure manifest builders (model server, training Job, YAML).
- :mod:`neuroweaver_kube.metrics`: metric names the model server exports and the alerts query.
- :mod:`neuroweaver_kube.client`: async client (server-side apply, status, scale, delete, Jobs).
- :mod:`neuroweaver_kube.testing`: a local stand-in of the Kubernetes API for tests.
"""

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
