"""NeuroWeaver SDK: typed clients for the four services and the `nw` command line."""

from .clients import Clients, Endpoints

__all__ = ["Clients", "Endpoints"]
