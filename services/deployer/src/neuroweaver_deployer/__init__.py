"""NeuroWeaver deployer: deployments of model versions (local processes or Kubernetes) and the model server."""
