"""`python -m neuroweaver_model_server --grpc-port P --http-port Q --metrics-port M --base-model B
--served-model-name N --model-version V [--adapter-uri U --adapter-sha256 S] [--load-in-4bit] [--project P]`
(flags or NW_MODEL_SERVER_* variables; `--help` lists them, and the shared settings it has no use for, such as
--port or --database-url, are refused). Credentials and TLS are best given as variables (never secrets on a
command line, which /proc shows to everyone): NW_MODEL_SERVER_AUTH_TOKENS (the token table: a JSON file path or
`token=project:role,...`), NW_MODEL_SERVER_TLS_CERT / _TLS_KEY / _TLS_CLIENT_CA (PEM paths)."""

from __future__ import annotations

import asyncio
import os

from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.logs import configure_logging
from neuroweaver_runtime.process import die_with_parent

from .app import ModelServer, ModelServerConfig


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = load_config(ModelServerConfig, "model_server", argv)
    if config.die_with_parent:
        die_with_parent()
    configure_logging("model-server", config.log_level)
    server = ModelServer(config)
    # No uvloop here (unlike the control-plane services): measured with SmolLM2-135M on 2 cores, uvloop made
    # generation in the worker thread ~4x slower (TTFT 2.7 s vs 0.33 s, GIL hand-offs), the default loop does not.
    asyncio.run(server.grpc.run_until_signal())


if __name__ == "__main__":
    main()
