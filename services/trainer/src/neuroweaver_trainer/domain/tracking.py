"""Experiment trackers of a job (MLflow, TensorBoard): settings, the trainer-wide defaults and their rules.

The URI is checked before anything is stored: a scheme the worker cannot log to, credentials that would be stored
and shown by GetTrainingJob, or control characters are field violations. Whether the server answers is the
worker's business: an unreachable tracker never fails a job (it says so in a LOG event).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from neuroweaver_runtime.errors import FailedPrecondition, Violations

MLFLOW_SCHEMES = ("http", "https", "file")
MAX_URI = 2048
MAX_EXPERIMENT = 500  # MLflow's limit on experiment names


@dataclass
class TrackingSettings:
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = ""
    tensorboard: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.mlflow_tracking_uri or self.mlflow_experiment or self.tensorboard)


def mlflow_uri_problem(uri: str) -> str | None:
    """Why `uri` is not a tracking URI the worker can log to, or None."""
    if len(uri) > MAX_URI:
        return f"mlflow_tracking_uri is longer than {MAX_URI} characters"
    if any(ord(c) < 32 or c == "\x7f" or c.isspace() for c in uri):
        return "mlflow_tracking_uri must not contain whitespace or control characters"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        return f"mlflow_tracking_uri is not a valid URI: {exc}"
    if parts.scheme not in MLFLOW_SCHEMES:
        return (
            f"mlflow_tracking_uri must be an http://, https:// (an MLflow tracking server) or file:/// URI, "
            f"not {parts.scheme + '://' if parts.scheme else 'a bare path'}"
        )
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            return "a file tracking URI must be absolute: file:///path/to/mlruns"
        if ".." in parts.path.split("/"):
            return "a file tracking URI must not contain `..`"
        return None
    if not parts.hostname:
        return "mlflow_tracking_uri needs a host: http://host:port"
    if parts.username is not None or parts.password is not None:
        return (
            "mlflow_tracking_uri must not carry credentials (they would be stored with the job and shown to its "
            "readers); give the worker MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    if parts.query or parts.fragment:
        return "mlflow_tracking_uri must not have a query or fragment"
    return None


def validate_tracking(
    t: TrackingSettings, v: Violations, *, export: bool = False, prefix: str = "training_job.tracking."
) -> None:
    if export and t.configured:
        v.add(prefix.rstrip("."), "EXPORT jobs train nothing: tracking applies to the training methods only")
        return
    if t.mlflow_tracking_uri and (problem := mlflow_uri_problem(t.mlflow_tracking_uri)):
        v.add(prefix + "mlflow_tracking_uri", problem)
    name = t.mlflow_experiment
    if len(name) > MAX_EXPERIMENT:
        v.add(prefix + "mlflow_experiment", f"mlflow_experiment is longer than {MAX_EXPERIMENT} characters")
    elif any(ord(c) < 32 or c == "\x7f" for c in name):
        v.add(prefix + "mlflow_experiment", "mlflow_experiment must not contain control characters")
    elif name and not name.strip():
        v.add(prefix + "mlflow_experiment", "mlflow_experiment must not be blank")


def apply_tracking_defaults(t: TrackingSettings, defaults: TrackingSettings, target_model: str) -> None:
    """The trainer-wide defaults fill what the job left unset; the experiment defaults to the target model's name
    (so the runs of one model sit side by side)."""
    t.mlflow_tracking_uri = t.mlflow_tracking_uri or defaults.mlflow_tracking_uri
    t.tensorboard = t.tensorboard or defaults.tensorboard
    if t.mlflow_tracking_uri:
        t.mlflow_experiment = t.mlflow_experiment or defaults.mlflow_experiment or target_model or "neuroweaver"


@dataclass(frozen=True)
class TrackingServers:
    """Where a job's own `mlflow_tracking_uri` may point: the worker sends the job's parameters, metrics and adapter
    there, and a `file://` store is written on the trainer's (or the worker pod's) file system. Unchecked, that is a
    server-side request forgery and a write anywhere the worker can write, for any operator of any project. So the
    trainer's `--mlflow-tracking-uris` lists the allowed URI prefixes (the trainer-wide default is always allowed);
    with no list, a trainer with auth off (one user on their own machine) accepts any http(s) server and one with
    auth on accepts none. A `file://` store is accepted only when listed."""

    prefixes: tuple[str, ...] = ()
    default: str = ""
    open_when_unset: bool = True

    @classmethod
    def from_setting(cls, setting: str, default: str, *, auth_enabled: bool) -> TrackingServers:
        prefixes = tuple(p.strip().rstrip("/") for p in (setting or "").split(",") if p.strip())
        for prefix in prefixes:
            if problem := mlflow_uri_problem(prefix):
                raise ValueError(f"mlflow tracking URI prefix {prefix[:60]!r}: {problem}")
        return cls(prefixes, default, open_when_unset=not auth_enabled)

    def check(self, uri: str) -> None:
        """Raises FAILED_PRECONDITION `TRACKING_URI_NOT_ALLOWED` for a URI a job may not log to."""
        if not uri or uri == self.default:
            return
        if any(uri == p or uri.startswith(p + "/") for p in self.prefixes):
            return
        if not self.prefixes and self.open_when_unset and not uri.startswith("file:"):
            return
        what = "lists none" if not self.prefixes else "does not list it"
        if not self.prefixes and self.open_when_unset:
            what = "accepts a file:// store only when it lists it"
        raise FailedPrecondition(
            f"training_job.tracking.mlflow_tracking_uri is not allowed here: the trainer's --mlflow-tracking-uris {what}",
            reason="TRACKING_URI_NOT_ALLOWED",
        )
