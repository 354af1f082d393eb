"""NeuroWeaver experiments service: A/B tests between model versions."""
