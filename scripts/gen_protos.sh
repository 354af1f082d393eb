#!/usr/bin/env bash
# Generates Python messages, gRPC stubs and mypy-protobuf stubs from protos/ into libs/neuroweaver-proto.
# The output is committed; CI runs this and fails on any diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
BIN="$(dirname "$PY")"
OUT=libs/neuroweaver-proto/src
# The AIP annotations (google/api/field_behavior.proto, resource.proto) resolve locally: the Buf Schema Registry is
# not reachable. They are copied from the installed googleapis-common-protos into protos/google/api, committed so that
# buf (lint, breaking, the TypeScript generation) reads them without a venv; `make proto-check` fails when the copies
# drift from the package. The generated Python imports google.api.*_pb2 from that same package at run time.
SITE="$("$PY" -c 'import os, google.api.field_behavior_pb2 as m; print(os.path.dirname(m.__file__))')"
mkdir -p protos/google/api
for f in field_behavior.proto resource.proto; do cp "$SITE/$f" "protos/google/api/$f"; done
rm -rf "$OUT/neuroweaver"
mkdir -p "$OUT"
mapfile -t files < <(cd protos && find neuroweaver -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$OUT" --grpc_python_out="$OUT" --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
  "${files[@]}"
# A package for every generated directory.
find "$OUT/neuroweaver" -type d -exec sh -c 'for d; do [ -f "$d/__init__.py" ] || : > "$d/__init__.py"; done' _ {} +
: > "$OUT/neuroweaver/py.typed"
echo "generated $(find "$OUT/neuroweaver" -name '*_pb2.py' | wc -l) modules into $OUT/neuroweaver"
