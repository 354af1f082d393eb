"""Deterministic, GrowthBook-compatible variant assignment. The pure code lives in `neuroweaver_runtime.assignment`,
shared with the SDK's local evaluation (`neuroweaver_sdk.experiments`), so the server and the SDK answer from one
implementation; re-exported here for the domain."""

from neuroweaver_runtime.assignment import *  # noqa: F403
from neuroweaver_runtime.assignment import __all__ as __all__  # noqa: PLE0605
