"""`python -m neuroweaver_deployer [--port P] [--database-url URL] ...` (flags or NW_DEPLOYER_* variables)."""

from __future__ import annotations

import asyncio

from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.logs import configure_logging

from .app import DeployerConfig, build


def main(argv: list[str] | None = None) -> None:
    config = load_config(DeployerConfig, "deployer", argv)
    configure_logging("deployer", config.log_level)
    # No uvloop here: its subprocess spawn runs Python's after-fork hooks in the child before exec, and model
    # servers spawned from this threaded grpc.aio process died with SIGSEGV before writing a byte. The default
    # loop spawns through subprocess.Popen (no Python between fork and exec).
    asyncio.run(_serve(config))


async def _serve(config) -> None:
    # build() opens grpc.aio channels (registry client), which need the running loop: with uvloop installed there is
    # no implicit default loop outside asyncio.run.
    await build(config).run_until_signal()


if __name__ == "__main__":
    main()
