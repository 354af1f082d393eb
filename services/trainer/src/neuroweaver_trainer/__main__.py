"""`python -m neuroweaver_trainer [--port P] [--database-url URL] ...` (flags or NW_TRAINER_* variables)."""

from __future__ import annotations

import asyncio

from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.logs import configure_logging

from .app import TrainerConfig, build


def main(argv: list[str] | None = None) -> None:
    config = load_config(TrainerConfig, "trainer", argv)
    configure_logging("trainer", config.log_level)
    # No uvloop here: the trainer forks worker processes from a process that holds tokenizer/torch threads,
    # and uvloop's fork+exec path crashed such children (SIGSEGV before exec) in our tests. The trainer's
    # RPC rate is low; the default loop is plenty.
    asyncio.run(build(config).run_until_signal())


if __name__ == "__main__":
    main()
