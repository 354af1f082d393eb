"""`make up`: every installed service on the embedded default, in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from .platform import LocalPlatform, console_installed


def main() -> None:
    data_dir = Path(os.environ.get("NW_DATA_DIR", Path.home() / ".neuroweaver"))
    stop = threading.Event()
    # Handlers, not a blocked signal mask: children inherit a blocked mask and would then ignore SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    platform = LocalPlatform(data_dir, console=console_installed())
    names = [*platform.services, *(["console"] if platform.console else [])]
    print(f"starting {', '.join(names)} (data in {data_dir}, logs in {data_dir / 'logs'})", flush=True)
    platform.start()
    try:
        for name, target in platform.targets().items():
            print(f"  {name:<12} {target}   grpcurl -plaintext {target} list", flush=True)
        if platform.console:
            print(f"  {'console':<12} {platform.console_url}   open it in a browser", flush=True)
        print("serving; Ctrl-C stops everything", flush=True)
        while not stop.wait(1.0):
            for name, proc in platform.processes.items():
                if proc.poll() is not None:
                    print(
                        f"{name} exited with {proc.returncode}; stopping everything (see {data_dir / 'logs' / name}.log)",
                        flush=True,
                    )
                    stop.set()
    finally:
        platform.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
