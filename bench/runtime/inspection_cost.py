"""Cost of the interceptor's request inspection (neuroweaver_runtime.inspection.inspect) per request, on the
deserialized requests the interceptor sees: a small read, metric and exposure batches (doubles put NUL bytes on the
wire, so every string is visited for NUL), answers with long prompts, a model version with lineage and labels.

    .venv/bin/python bench/runtime/inspection_cost.py [--runtime-src DIR] [--repeat 7]

`--runtime-src` puts another copy of the runtime package first on the path (for example an older checkout's
`libs/neuroweaver-runtime/src`), to compare two versions on the same machine; run both interleaved.
"""

from __future__ import annotations

import argparse
import sys
import timeit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-src", default="", help="directory holding another neuroweaver_runtime package")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.runtime_src:
        sys.path.insert(0, args.runtime_src)
    from neuroweaver.experiments.v1 import experiment_pb2 as epb
    from neuroweaver.experiments.v1 import experiments_service_pb2 as es
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rs
    from neuroweaver_runtime import inspection

    e = "projects/a/experiments/e"
    lineage = rpb.Lineage(
        base_model="builtin:smollm2-135m-instruct", parent_version="projects/a/models/m/versions/0.9.0",
        hyperparameters={"lr": "1e-4", "epochs": "3"},
    )  # fmt: skip
    cases = {
        "AssignVariant": es.AssignVariantRequest(experiment=e, unit_id="user-123"),
        "RecordMetricEvents, 1,000 events": es.RecordMetricEventsRequest(
            experiment=e,
            events=[
                epb.MetricEvent(experiment=e, unit_id=f"u{i}", metric="latency_ms", value=100.5 + i, idempotency_key=f"k{i}")
                for i in range(1000)
            ],
        ),
        "IngestEvents, 1,000 exposures + 1,000 events": es.IngestEventsRequest(
            batch_id=1,
            exposures=[epb.Exposure(experiment=e, unit_id=f"u{i}", variant="control", epoch=1) for i in range(1000)],
            events=[epb.MetricEvent(experiment=e, unit_id=f"u{i}", metric="m", value=1.5) for i in range(1000)],
        ),
        "RecordAnswers, 100 answers (4 KiB prompts)": es.RecordAnswersRequest(
            experiment=e, answers=[es.Answer(unit_id=f"u{i}", prompt="x" * 4096, answer="y" * 2048) for i in range(100)]
        ),
        "CreateModelVersion": rs.CreateModelVersionRequest(
            parent="projects/a/models/m",
            version="1.0.0",
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri="file:///a", sha256="ab" * 32), lineage=lineage, labels={"team": "x"}, notes="n"
            ),
        ),  # fmt: skip
    }
    print(f"inspection from {inspection.__file__}")
    for label, message in cases.items():
        incoming = inspection.lenient_deserializer(type(message).FromString, "x")(message.SerializeToString())
        inspection.inspect(incoming)  # the per-type plans are built once
        number = 2000 if message.ByteSize() < 10_000 else 50
        run = lambda incoming=incoming: inspection.inspect(incoming)  # noqa: E731
        best = min(timeit.repeat(run, number=number, repeat=args.repeat)) / number
        print(f"{label:46s} NUL byte on the wire: {incoming.may_hold_nul!s:5s} {best * 1e6:9.1f} µs")


if __name__ == "__main__":
    main()
