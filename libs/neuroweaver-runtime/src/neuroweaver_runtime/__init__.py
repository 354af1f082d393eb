"""Shared runtime of the NeuroWeaver services.

Everything a service needs that is not its own domain: the grpc.aio server with health, reflection and
graceful shutdown; interceptors (tracing, metrics, auth, error mapping); configuration; the async database
layer; page tokens, field masks, filters and resource names; typed clients with deadlines and retries.
"""
