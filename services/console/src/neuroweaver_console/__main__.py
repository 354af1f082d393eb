"""`python -m neuroweaver_console [--port P] [--registry-target ...] ...` (flags or NW_CONSOLE_* variables)."""

from __future__ import annotations

import asyncio

from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.logs import configure_logging

from .app import Console
from .config import ConsoleConfig


def main(argv: list[str] | None = None) -> None:
    config = load_config(ConsoleConfig, "console", argv)
    configure_logging("console", config.log_level)
    asyncio.run(Console(config).run_until_signal())


if __name__ == "__main__":
    main()
