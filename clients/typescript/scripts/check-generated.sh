#!/usr/bin/env bash
# CI check for @neuroweaver/client: the committed TypeScript in src/gen is what buf + protoc-gen-es produce from
# protos/ today, the vendored google/rpc protos still match googleapis-common-protos in the venv, and the
# package (and its live smoke test) type-check.
#   clients/typescript/scripts/check-generated.sh   (needs the root node_modules for buf; runs npm ci here when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(git rev-parse --show-toplevel)"
[ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error
# buf comes from the root package (the one `npx buf lint` uses); protoc-gen-es and tsc from this package.
[ -x "$ROOT/node_modules/.bin/buf" ] || { echo "no $ROOT/node_modules/.bin/buf: run npm install at the repo root" >&2; exit 1; }
export PATH="$PWD/node_modules/.bin:$PATH"

"$ROOT/node_modules/.bin/buf" generate
# Untracked files count too (a new proto gives a new file that a plain `git diff` would not see).
if [ -n "$(git status --porcelain --untracked-files=all -- src/gen)" ]; then
  git status --short --untracked-files=all -- src/gen >&2
  git --no-pager diff --stat -- src/gen >&2
  echo "clients/typescript/src/gen is stale: run 'npm run generate' in clients/typescript and commit it" >&2
  exit 1
fi

# The google/rpc protos are copies of the ones googleapis-common-protos ships; keep them identical.
RPC_SRC="$(ls -d "$ROOT"/.venv/lib/python3*/site-packages/google/rpc 2>/dev/null | head -1 || true)"
if [ -n "$RPC_SRC" ]; then
  for f in status.proto error_details.proto; do
    cmp -s "$RPC_SRC/$f" "proto/google/rpc/$f" || { echo "proto/google/rpc/$f differs from $RPC_SRC/$f" >&2; exit 1; }
  done
fi

tsc -p tsconfig.json --noEmit
# The smoke test imports the package by its name, which resolves to dist/: build it, then check the test.
tsc -p tsconfig.json
tsc -p test/tsconfig.json --noEmit
# The RelayCore example builds against this package (linked with file:../../clients/typescript).
EXAMPLE="$ROOT/examples/relaycore"
[ -d "$EXAMPLE/node_modules" ] || (cd "$EXAMPLE" && npm ci --no-audit --no-fund --loglevel=error)
tsc -p "$EXAMPLE/tsconfig.json" --noEmit
echo "clients/typescript: generated code up to date, tsc --noEmit passes (package, smoke test, examples/relaycore)"
