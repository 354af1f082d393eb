"""NeuroWeaver model registry: models, semantic versions with lineage, aliases, judges, audit events."""
