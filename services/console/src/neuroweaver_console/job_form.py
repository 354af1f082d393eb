"""The new-job form: its fields, the CreateTrainingJobRequest it stands for, and the same request as an `nw train
start` command and a grpcurl call. Pure functions (no I/O): training.py's handlers call the trainer."""

from __future__ import annotations

import json
import re
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf import json_format

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb

# The form's methods (the trainer's TrainingMethod without EXPORT, which trains nothing); SFT's 4-bit base is the
# QLoRA toggle, as RLAIF's is.
METHODS = {
    "sft": "SFT (supervised fine-tuning)",
    "rlaif": "RLAIF (SFT, then AI-judged preferences)",
    "dpo": "DPO on a preference dataset",
    "reward-model": "Reward model on a preference dataset",
}
BUMPS = {"minor": cpb.VERSION_BUMP_MINOR, "patch": cpb.VERSION_BUMP_PATCH, "major": cpb.VERSION_BUMP_MAJOR}
OPTIONS = {"method": METHODS, "version_bump": {b: b for b in BUMPS}}  # the selects' values and labels
CREATE = "neuroweaver.trainer.v1.TrainerService/CreateTrainingJob"


@dataclass(frozen=True)
class Field:
    name: str  # the form's input name (and id)
    label: str
    path: str  # the request field the trainer's violations name
    kind: str = "text"  # text, int, float, select, checkbox
    help: str = ""
    flag: str = ""  # the `nw train start` option


FIELDS = (
    Field("training_job_id", "Job id", "training_job_id", help="optional; generated when empty", flag="--job-id"),
    Field("display_name", "Display name", "training_job.display_name", help="optional", flag="--display-name"),
    Field("method", "Method", "training_job.method", kind="select"),
    Field("qlora", "QLoRA: train on the base quantized to 4-bit", "training_job.rlaif.qlora", kind="checkbox",
          help="SFT and RLAIF"),
    Field("base_model", "Base model", "training_job.base_model",
          help="a checkpoint directory under the trainer's model roots, or builtin:smollm2-135m-instruct",
          flag="--base-model"),
    Field("dataset_uri", "Dataset", "training_job.dataset_uri",
          help="JSONL under the trainer's dataset roots (file:// URI or path)", flag="--dataset"),
    Field("eval_dataset_uri", "Eval dataset", "training_job.eval_dataset_uri",
          help="optional; otherwise a fraction of the dataset is held out", flag="--eval-dataset"),
    Field("target_model", "Target model", "training_job.target_model",
          help="registry model that receives the new version: an id or projects/…/models/…", flag="--target-model"),
    Field("version_bump", "Version bump", "training_job.version_bump", kind="select", flag="--bump"),
    Field("num_epochs", "Epochs", "training_job.hyperparameters.num_epochs", kind="float", help="default 1",
          flag="--epochs"),
    Field("max_steps", "Max steps", "training_job.hyperparameters.max_steps", kind="int",
          help="overrides epochs when set", flag="--max-steps"),
    Field("learning_rate", "Learning rate", "training_job.hyperparameters.learning_rate", kind="float",
          help="default 2e-4", flag="--learning-rate"),
    Field("batch_size", "Batch size", "training_job.hyperparameters.batch_size", kind="int", help="default 4",
          flag="--batch-size"),
    Field("max_seq_length", "Max sequence length", "training_job.hyperparameters.max_seq_length", kind="int",
          help="tokens; default 512", flag="--max-seq-length"),
    Field("lora_r", "LoRA rank", "training_job.lora.r", kind="int", help="default 8", flag="--lora-r"),
    Field("lora_alpha", "LoRA alpha", "training_job.lora.alpha", kind="int", help="default 16", flag="--lora-alpha"),
    Field("priority", "Priority", "training_job.priority", kind="int",
          help="in [-1000, 1000]; higher runs first and may preempt", flag="--priority"),
    Field("prompts_uri", "Prompts", "training_job.rlaif.prompts_uri", help="JSONL of {prompt, reference?}",
          flag="--prompts"),
    Field("eval_prompts_uri", "Eval prompts", "training_job.rlaif.eval_prompts_uri", help="optional held-out prompts",
          flag="--eval-prompts"),
    Field("judge_version", "Judge version", "training_job.rlaif.judge_version",
          help="projects/…/judges/…/versions/… (or …/latest)", flag="--judge-version"),
)  # fmt: skip
BY_NAME = {f.name: f for f in FIELDS}
RLAIF_ONLY = ("prompts_uri", "eval_prompts_uri", "judge_version")
# Errors without a field violation that are still about one field (ErrorInfo.reason → form field).
REASON_FIELDS = {
    "TRAINING_JOB_ALREADY_EXISTS": "training_job_id",
    "PRIORITY_ABOVE_QUOTA": "priority",
    "JUDGE_VERSION_NOT_FOUND": "judge_version",
    "JUDGE_VERSION_UNUSABLE": "judge_version",
    "JUDGE_NOT_FOUND": "judge_version",
}
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Form:
    """What the person typed (kept as typed, so a refused form comes back unchanged) and what is wrong with it."""

    values: dict[str, str]
    request_id: str
    errors: dict[str, list[str]] = field(default_factory=dict)  # form field → messages
    other_errors: list[str] = field(default_factory=list)  # violations of fields the form does not show

    @classmethod
    def blank(cls) -> Form:
        values = {f.name: "" for f in FIELDS}
        values.update(method="sft", version_bump="minor")
        return cls(values, str(uuid.uuid4()))

    @classmethod
    def parse(cls, data: Mapping[str, object]) -> Form:
        values = {f.name: str(data.get(f.name, "")).strip() for f in FIELDS}
        values["qlora"] = "on" if values["qlora"] else ""
        request_id = str(data.get("request_id", ""))
        # A resubmitted form keeps its request id: a double submit creates one job.
        return cls(values, request_id if _UUID.match(request_id) else str(uuid.uuid4()))

    def error(self, path: str, message: str) -> None:
        """A violation of request field `path`: next to its input, or in the summary when the form has none."""
        for f in FIELDS:
            if path == f.path or path.startswith(f.path + "."):
                self.errors.setdefault(f.name, []).append(message)
                return
        self.other_errors.append(f"{path}: {message}" if path else message)

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.other_errors)

    @property
    def method(self) -> str:
        return self.values["method"] if self.values["method"] in METHODS else "sft"

    def number(self, name: str) -> float | int:
        """The field's number (0 when empty: the trainer's default); a form error when it is not one."""
        text, kind = self.values[name], BY_NAME[name].kind
        if not text:
            return 0
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            self.errors.setdefault(name, []).append("must be a whole number" if kind == "int" else "must be a number")
            return 0


def model_name(project: str, ref: str) -> str:
    """A model id in the console's project, or a full name as given (as `nw --target-model` reads it)."""
    return ref if not ref or ref.startswith("projects/") else f"projects/{project}/models/{ref}"


def build_request(form: Form, project: str) -> tsvc.CreateTrainingJobRequest:
    """The request the form stands for. Numbers that do not parse are form errors (the request gets 0 there)."""
    v, method = form.values, form.method
    qlora = bool(v["qlora"])
    if qlora and method not in ("sft", "rlaif"):
        form.errors.setdefault("qlora", []).append("4-bit QLoRA applies to SFT and RLAIF")
    if method not in METHODS and v["method"]:
        form.errors.setdefault("method", []).append(f"method must be one of {', '.join(METHODS)}")
    if v["version_bump"] not in BUMPS:
        form.errors.setdefault("version_bump", []).append(f"version bump must be one of {', '.join(BUMPS)}")
    job = tpb.TrainingJob(
        display_name=v["display_name"],
        base_model=v["base_model"],
        dataset_uri=v["dataset_uri"],
        eval_dataset_uri=v["eval_dataset_uri"],
        method={
            "sft": tpb.TRAINING_METHOD_SFT_QLORA if qlora else tpb.TRAINING_METHOD_SFT_LORA,
            "rlaif": tpb.TRAINING_METHOD_RLAIF,
            "dpo": tpb.TRAINING_METHOD_DPO,
            "reward-model": tpb.TRAINING_METHOD_REWARD_MODEL,
        }[method],
        target_model=model_name(project, v["target_model"]),
        version_bump=BUMPS.get(v["version_bump"], cpb.VERSION_BUMP_MINOR),
        priority=int(form.number("priority")),
        hyperparameters=tpb.Hyperparameters(
            num_epochs=form.number("num_epochs"),
            max_steps=int(form.number("max_steps")),
            learning_rate=form.number("learning_rate"),
            batch_size=int(form.number("batch_size")),
            max_seq_length=int(form.number("max_seq_length")),
        ),
        lora=tpb.LoraConfig(r=int(form.number("lora_r")), alpha=int(form.number("lora_alpha"))),
    )
    if method == "rlaif":
        job.rlaif.CopyFrom(
            tpb.RlaifConfig(
                prompts_uri=v["prompts_uri"],
                eval_prompts_uri=v["eval_prompts_uri"],
                judge_version=v["judge_version"],
                qlora=qlora,
            )
        )
    else:
        for name in RLAIF_ONLY:
            if v[name]:
                form.errors.setdefault(name, []).append("applies to RLAIF only")
    return tsvc.CreateTrainingJobRequest(
        parent=f"projects/{project}", training_job_id=v["training_job_id"], training_job=job, request_id=form.request_id
    )


def nw_command(form: Form, project: str, trainer_target: str) -> str:
    """`nw train start` with the form's settings (empty and zero fields left to the CLI's and trainer's defaults)."""
    v, method = form.values, form.method
    args = ["nw", "--project", project, "--trainer", trainer_target, "train", "start"]
    cli_method = {"sft": "qlora" if v["qlora"] else "lora"}.get(method, method)
    args += ["--method", cli_method]
    for f in FIELDS:
        if not f.flag or not v[f.name] or (method != "rlaif" and f.name in RLAIF_ONLY):
            continue
        if f.kind in ("int", "float") and (f.name in form.errors or form.number(f.name) == 0):
            continue
        if f.name == "version_bump" and v[f.name] == "minor":
            continue  # the CLI's default
        args += [f.flag, v[f.name]]
    if method == "rlaif" and v["qlora"]:
        args.append("--qlora")
    return shlex.join(args)


def grpcurl_command(request: tsvc.CreateTrainingJobRequest, trainer_target: str, *, tls: bool, token: bool) -> str:
    """grpcurl with the request as proto3 JSON (without request_id: a run of it is a new job of its own)."""
    body = tsvc.CreateTrainingJobRequest()
    body.CopyFrom(request)
    body.ClearField("request_id")
    text = json.dumps(json_format.MessageToDict(body), indent=2)
    parts = ['grpcurl -cacert "$NW_TLS_CA"' if tls else "grpcurl -plaintext"]  # the CA file of the shell's user
    if token:
        parts.append('-H "authorization: Bearer $NW_TOKEN"')  # the token stays in the shell, never in the page
    parts += ["-d", shlex.quote(text), shlex.join([trainer_target, CREATE])]
    return " ".join(parts)
