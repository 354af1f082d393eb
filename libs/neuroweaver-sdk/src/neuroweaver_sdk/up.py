"""`make up`: every installed service on the embedded default, in the foreground until Ctrl-C."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .platform import LocalPlatform


def main() -> None:
    data_dir = Path(os.environ.get("NW_DATA_DIR", Path.home() / ".neuroweaver"))
    platform = LocalPlatform(data_dir)
    print(f"starting {', '.join(platform.services)} (data in {data_dir}, logs in {data_dir / 'logs'})", flush=True)
    platform.start()
    for name, target in platform.targets().items():
        print(f"  {name:<12} {target}   grpcurl -plaintext {target} list", flush=True)
    print("serving; Ctrl-C stops everything", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        platform.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
