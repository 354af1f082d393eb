"""Experiment-tracker settings: URI rules (field violations), trainer-wide defaults, proto round trip, the trainer's
startup check of its own defaults, and the MLflow parameters a job's run gets."""

from __future__ import annotations

import pytest

from neuroweaver.trainer.v1 import training_job_pb2 as pb
from neuroweaver_runtime.errors import InvalidArgument, Violations
from neuroweaver_trainer.api.convert import job_from_pb, job_to_pb
from neuroweaver_trainer.domain.job import Method, TrainingJob
from neuroweaver_trainer.domain.tracking import TrackingSettings, apply_tracking_defaults, validate_tracking

P = "training_job.tracking."


def _violations(t: TrackingSettings, export: bool = False) -> dict[str, str]:
    v = Violations()
    validate_tracking(t, v, export=export)
    return {f.field: f.description for f in v.items}


@pytest.mark.parametrize(
    "uri",
    ["http://127.0.0.1:5000", "https://mlflow.example.com", "http://mlflow:5000/prefix", "file:///var/lib/mlruns", ""],
)
def test_accepted_tracking_uris(uri):
    assert _violations(TrackingSettings(mlflow_tracking_uri=uri, tensorboard=True)) == {}


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("ftp://host/x", "must be an http://, https://"),
        ("databricks", "not a bare path"),
        ("/var/lib/mlruns", "not a bare path"),
        ("sqlite:///mlflow.db", "not sqlite://"),
        ("http://", "needs a host"),
        ("http://user:secret@mlflow:5000", "must not carry credentials"),
        ("http://mlflow:99999", "not a valid URI"),
        ("http://ml flow:5000", "whitespace or control"),
        ("http://mlflow:5000/\x00", "whitespace or control"),
        ("file://relative/dir", "must be absolute"),
        ("http://mlflow:5000/?token=x", "query or fragment"),
        ("http://h/" + "a" * 3000, "longer than 2048"),
    ],
)
def test_refused_tracking_uris_are_field_violations(uri, says):
    got = _violations(TrackingSettings(mlflow_tracking_uri=uri))
    assert list(got) == [P + "mlflow_tracking_uri"] and says in got[P + "mlflow_tracking_uri"], got


def test_experiment_name_rules_and_export_jobs():
    assert list(_violations(TrackingSettings(mlflow_experiment="x" * 501))) == [P + "mlflow_experiment"]
    assert list(_violations(TrackingSettings(mlflow_experiment="a\nb"))) == [P + "mlflow_experiment"]
    assert list(_violations(TrackingSettings(mlflow_experiment="   "))) == [P + "mlflow_experiment"]
    assert _violations(TrackingSettings(mlflow_experiment="projects/p/models/m")) == {}
    assert list(_violations(TrackingSettings(tensorboard=True), export=True)) == ["training_job.tracking"]
    assert _violations(TrackingSettings(), export=True) == {}


def test_raised_as_invalid_argument_with_the_field():
    v = Violations()
    validate_tracking(TrackingSettings(mlflow_tracking_uri="gopher://x"), v)
    with pytest.raises(InvalidArgument) as exc:
        v.raise_if_any()
    assert exc.value.violations[0].field == P + "mlflow_tracking_uri"


def test_trainer_defaults_fill_what_the_job_left_unset():
    defaults = TrackingSettings("http://mlflow:5000", "", True)
    t = TrackingSettings()
    apply_tracking_defaults(t, defaults, "projects/p/models/m")
    assert t == TrackingSettings("http://mlflow:5000", "projects/p/models/m", True)  # experiment: the target model
    own = TrackingSettings("http://other:5000", "mine", False)
    apply_tracking_defaults(own, TrackingSettings("http://mlflow:5000", "team", False), "projects/p/models/m")
    assert own == TrackingSettings("http://other:5000", "mine", False)
    none = TrackingSettings()
    apply_tracking_defaults(none, TrackingSettings(), "projects/p/models/m")
    assert not none.configured  # no defaults: no trackers, no experiment name


def test_proto_round_trip():
    m = pb.TrainingJob(
        method=pb.TRAINING_METHOD_SFT_LORA,
        tracking=pb.Tracking(mlflow_tracking_uri="http://m:5000", mlflow_experiment="e", tensorboard=True),
    )
    job = job_from_pb(m)
    assert job.tracking == TrackingSettings("http://m:5000", "e", True)
    assert job_to_pb(job).tracking == m.tracking
    assert not job_to_pb(job_from_pb(pb.TrainingJob(method=pb.TRAINING_METHOD_SFT_LORA))).HasField("tracking")


def test_a_bad_trainer_default_stops_the_trainer_at_start(tmp_path):
    from neuroweaver_trainer.app import TrainerConfig, build

    with pytest.raises(SystemExit, match="mlflow_tracking_uri"):
        build(TrainerConfig(port=0, metrics_port=-1, data_dir=str(tmp_path), run_jobs=False, mlflow_tracking_uri="mlflow:5000"))


def test_job_params_flatten_the_effective_settings():
    from neuroweaver_trainer.worker.tracking import job_params

    class _T:
        job = TrainingJob(
            name="projects/p/trainingJobs/j", method=Method.SFT_LORA, base_model="b", target_model="projects/p/models/m"
        )

    job = _T.job
    job.hyperparameters.learning_rate, job.hyperparameters.seed, job.lora.target_modules = 1e-3, 0, ["q_proj", "v_proj"]
    params = job_params(_T())  # type: ignore[arg-type]
    assert params["method"] == "SFT_LORA" and params["job"] == "projects/p/trainingJobs/j"
    assert params["hyperparameters.learning_rate"] == 1e-3 and params["hyperparameters.seed"] == 0  # 0 is a value
    assert params["lora.target_modules"] == "q_proj,v_proj" and "rlaif.algorithm" not in params


def test_where_a_jobs_own_mlflow_uri_may_point():
    """A job's tracking URI is a request the worker sends (and a file:// store it writes): only allowed servers."""
    from neuroweaver_runtime.errors import FailedPrecondition
    from neuroweaver_trainer.domain.tracking import TrackingServers

    def refused(servers: TrackingServers, uri: str) -> bool:
        try:
            servers.check(uri)
        except FailedPrecondition as exc:
            assert exc.reason == "TRACKING_URI_NOT_ALLOWED"
            return True
        return False

    listed = TrackingServers.from_setting(
        "http://mlflow.internal:5000/, file:///srv/mlruns", "https://default:5000", auth_enabled=True
    )
    assert not refused(listed, "http://mlflow.internal:5000") and not refused(listed, "http://mlflow.internal:5000/x")
    assert not refused(listed, "file:///srv/mlruns/team-a") and not refused(listed, "https://default:5000")
    assert not refused(listed, "")  # no tracker of its own: the default (or none)
    for uri in ("http://mlflow.internal:5000.evil.example", "http://169.254.169.254", "file:///srv/mlrunsx",
                "file:///var/lib/neuroweaver/artifacts"):  # fmt: skip
        assert refused(listed, uri), uri
    open_single_user = TrackingServers.from_setting("", "", auth_enabled=False)
    assert not refused(open_single_user, "http://anything:5000") and refused(open_single_user, "file:///tmp/mlruns")
    assert refused(TrackingServers.from_setting("", "", auth_enabled=True), "http://anything:5000")
    with pytest.raises(ValueError):
        TrackingServers.from_setting("ftp://x", "", auth_enabled=True)
    assert validate_problem("file:///srv/mlruns/../../etc")


def validate_problem(uri: str) -> bool:
    v = Violations()
    validate_tracking(TrackingSettings(mlflow_tracking_uri=uri), v)
    return bool(v.items)
