#!/usr/bin/env bash
# The README's first command as a new user runs it: `make demo` in a fresh clone of this repository's HEAD
# (installing everything into the clone's own .venv), then the checks a test would make of what it leaves:
# a summary with a trained, registered, deployed and A/B-tested version, under 20 minutes, nothing left running.
#
#   scripts/demo_fresh_clone.sh [WORK_DIR]     # the clone, log and summary end up in WORK_DIR
set -euo pipefail
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=${1:-$(mktemp -d /tmp/nw-demo-clone.XXXXXX)}
mkdir -p "$work"
git clone -q "$src" "$work/neuroweaver"
cd "$work/neuroweaver"
echo "fresh clone of $(git rev-parse --short HEAD) in $PWD; log: $work/demo.log"
start=$(date +%s)
make demo > "$work/demo.log" 2>&1 || { tail -n 60 "$work/demo.log"; echo "make demo failed"; exit 1; }
seconds=$(( $(date +%s) - start ))
echo "make demo, install included: ${seconds} s"
cp .data/demo/demo-summary.json "$work/demo-summary.json"
python3 - "$work/demo-summary.json" "$seconds" <<'PY'
import json, sys
s, wall = json.load(open(sys.argv[1])), int(sys.argv[2])
t, e, p = s["training"], s["experiment"], s["promotion"]
problems = []
if not t["version"].startswith("projects/default/models/"):
    problems.append(f"no registered version: {t['version']!r}")
for metric in ("judge_win_rate_vs_base", "judge_win_rate_vs_parent", "train_loss"):
    if metric not in t["metrics"]:
        problems.append(f"training metric {metric} missing")
if not t["lineage_judge"]:
    problems.append("the version's lineage names no judge")
if len(e["variants"]) != 2 or min(v["units"] for v in e["variants"].values()) < 1:
    problems.append(f"experiment traffic missing: {e['variants']}")
if p["promoted"] and not p["winner"]:
    problems.append("promoted without a winner")
if s["total_seconds"] > 20 * 60:
    problems.append(f"the demo took {s['total_seconds']} s (> 20 min)")
print(f"demo {s['total_seconds']:.0f} s (wall with install {wall} s); decision {e['decision']}; promoted {p['promoted']}")
if problems:
    sys.exit("demo summary check failed: " + "; ".join(problems))
PY
if pgrep -f "$work/neuroweaver" > /dev/null; then
  echo "processes left running:"; pgrep -af "$work/neuroweaver"; exit 1
fi
echo "nothing left running; summary: $work/demo-summary.json"
