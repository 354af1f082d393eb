"""`python -m neuroweaver_registry [--port P] [--database-url URL] ...` (flags or NW_REGISTRY_* variables)."""

from __future__ import annotations

import asyncio

from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.logs import configure_logging

from .app import RegistryConfig, build


def main(argv: list[str] | None = None) -> None:
    config = load_config(RegistryConfig, "registry", argv)
    configure_logging("registry", config.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(build(config).run_until_signal())


if __name__ == "__main__":
    main()
