"""NeuroWeaver web console: an HTTP front end on the services' gRPC APIs (no database of its own)."""
