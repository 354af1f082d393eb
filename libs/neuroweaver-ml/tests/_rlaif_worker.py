"""Child process for the RLAIF kill/resume test: runs run_rlaif, prints events as JSON lines and,
at the first event of the kind named in argv[2] (within stage argv[3] if given), blocks on stdin so
that the parent can SIGKILL it at a known point."""

import json
import sys

from neuroweaver_ml.rlaif import JudgeConfig, RlaifConfig, run_rlaif
from neuroweaver_ml.training import event_to_dict


def main() -> None:
    d = json.loads(sys.argv[1])
    d["judge"] = JudgeConfig(**d["judge"])
    cfg = RlaifConfig(**d)
    block_kind = sys.argv[2]

    def on_event(ev):
        print(json.dumps(event_to_dict(ev)), flush=True)
        if ev.kind == block_kind:
            sys.stdin.readline()  # wait here to be killed

    run_rlaif(cfg, on_event)


if __name__ == "__main__":
    main()
