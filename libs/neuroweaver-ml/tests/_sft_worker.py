"""Child process for the SIGKILL resume test: prints events as JSON lines and, after the first
checkpoint event, blocks on stdin so that the parent can kill it at a known point."""

import json
import sys

from neuroweaver_ml.training import SFTConfig, event_to_dict, run_sft


def main() -> None:
    cfg = SFTConfig(**json.loads(sys.argv[1]))

    def on_event(ev):
        print(json.dumps(event_to_dict(ev)), flush=True)
        if ev.kind == "checkpoint":
            sys.stdin.readline()  # wait here to be killed

    run_sft(cfg, on_event)


if __name__ == "__main__":
    main()
