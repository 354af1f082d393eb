"""EXPORT jobs in the domain: what they must name, what they must leave empty, the default weights type, and the
proto round trip of ExportConfig; export settings on other methods are refused."""

from __future__ import annotations

from neuroweaver.trainer.v1 import training_job_pb2 as pb
from neuroweaver_runtime.errors import Violations
from neuroweaver_trainer.api.convert import job_from_pb, job_to_pb
from neuroweaver_trainer.domain.job import (
    EXPORT_QUANTIZATIONS,
    ExportSettings,
    Method,
    TrainingJob,
    apply_defaults,
    validate_job,
)

V = "projects/p/models/m/versions/1.1.0"


def _violations(job: TrainingJob) -> set[str]:
    v = Violations()
    validate_job(job, v)
    return {item.field for item in v.items}


def test_an_export_job_names_a_version_and_a_format_only():
    ok = TrainingJob(name="projects/p/trainingJobs/e", method=Method.EXPORT, export=ExportSettings(V, "gguf", "q4_k_m"))
    assert _violations(ok) == set()
    apply_defaults(ok)
    assert ok.export.quantization == "q4_k_m"
    assert (ok.hyperparameters.learning_rate, ok.lora.r, ok.version_bump) == (0.0, 0, "")  # nothing to train
    for fmt, quants in EXPORT_QUANTIZATIONS.items():
        job = TrainingJob(name="projects/p/trainingJobs/e", method=Method.EXPORT, export=ExportSettings(V, fmt))
        apply_defaults(job)
        assert job.export.quantization == quants[0] == "f16"
    bad = TrainingJob(
        name="projects/p/trainingJobs/e", method=Method.EXPORT, base_model="b", dataset_uri="file:///d",
        target_model="projects/p/models/m", export=ExportSettings("projects/p/models/m", "zip", "q4"),
    )  # fmt: skip
    assert _violations(bad) == {
        "training_job.export.model_version", "training_job.export.format", "training_job.base_model",
        "training_job.dataset_uri", "training_job.target_model",
    }  # fmt: skip
    lora_q4 = TrainingJob(name="projects/p/trainingJobs/e", method=Method.EXPORT, export=ExportSettings(V, "gguf-lora", "q4_k_m"))
    assert _violations(lora_q4) == {"training_job.export.quantization"}
    sft_with_export = TrainingJob(
        name="projects/p/trainingJobs/j", method=Method.SFT_LORA, base_model="b", dataset_uri="file:///d",
        target_model="projects/p/models/m", export=ExportSettings(V, "gguf"),
    )  # fmt: skip
    assert _violations(sft_with_export) == {"training_job.export"}


def test_export_config_round_trips_through_the_proto():
    m = pb.TrainingJob(
        method=pb.TRAINING_METHOD_EXPORT,
        export=pb.ExportConfig(model_version=V, format=pb.EXPORT_FORMAT_GGUF_LORA, quantization="q8_0"),
    )
    job = job_from_pb(m)
    assert (job.method, job.export.model_version, job.export.format, job.export.quantization) == (
        Method.EXPORT, V, "gguf-lora", "q8_0",
    )  # fmt: skip
    back = job_to_pb(job)
    assert (back.method, back.export.format, back.export.quantization) == (
        pb.TRAINING_METHOD_EXPORT,
        pb.EXPORT_FORMAT_GGUF_LORA,
        "q8_0",
    )
    assert not job_to_pb(job_from_pb(pb.TrainingJob(method=pb.TRAINING_METHOD_SFT_LORA))).HasField("export")
