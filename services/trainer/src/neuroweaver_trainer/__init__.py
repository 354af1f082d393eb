"""NeuroWeaver trainer service."""
