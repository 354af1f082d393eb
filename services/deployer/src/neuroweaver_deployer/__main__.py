"""`python -m neuroweaver_deployer [--port P] [--database-url URL] ...` (flags or NW_DEPLOYER_* variables)."""

from __future__ import annotations

import asyncio

from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.logs import configure_logging

from .app import DeployerConfig, build


def main(argv: list[str] | None = None) -> None:
    config = load_config(DeployerConfig, "deployer", argv)
    configure_logging("deployer", config.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(build(config).run_until_signal())


if __name__ == "__main__":
    main()
