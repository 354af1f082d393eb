"""Protobuf ⇄ domain conversions of the deployer API."""

from __future__ import annotations

from neuroweaver.deployer.v1 import deployment_pb2 as pb
from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.etag import etag_for
from neuroweaver_runtime.timestamps import to_timestamp

from ..domain.model import Autoscaling, Backend, Condition, Deployment, Resources, Revision, Serving, State, Toleration

BACKEND_FROM_PB = {
    pb.BACKEND_UNSPECIFIED: Backend.LOCAL,
    pb.BACKEND_LOCAL: Backend.LOCAL,
    pb.BACKEND_KUBERNETES: Backend.KUBERNETES,
}
BACKEND_TO_PB = {Backend.LOCAL: pb.BACKEND_LOCAL, Backend.KUBERNETES: pb.BACKEND_KUBERNETES}
STATE_TO_PB = {s: getattr(pb.Deployment, f"STATE_{s.value}") for s in State}


ENGINE_FROM_PB: dict[int, str] = {
    pb.ServingConfig.ENGINE_UNSPECIFIED: "",
    pb.ServingConfig.ENGINE_TRANSFORMERS: "transformers",
    pb.ServingConfig.ENGINE_LLAMA_CPP: "llama.cpp",
    pb.ServingConfig.ENGINE_VLLM: "vllm",
}
ENGINE_TO_PB = {v: k for k, v in ENGINE_FROM_PB.items()}


def _engine(value: int) -> str:
    if value not in ENGINE_FROM_PB:
        raise InvalidArgument(f"engine has unknown value {value}", field="deployment.serving.engine", reason="INVALID_ENUM")
    return ENGINE_FROM_PB[value]


def deployment_from_pb(m: pb.Deployment) -> Deployment:
    if m.backend not in BACKEND_FROM_PB:
        raise InvalidArgument(f"backend has unknown value {m.backend}", field="deployment.backend", reason="INVALID_ENUM")
    r, a, s = m.resources, m.autoscaling, m.serving
    return Deployment(
        name=m.name,
        display_name=m.display_name,
        model_version=m.model_version,
        model_alias=m.model_alias,
        backend=BACKEND_FROM_PB[m.backend],
        replicas=m.replicas,
        autoscaling=Autoscaling(a.min_replicas, a.max_replicas, a.target_cpu_utilization, a.target_inflight_requests),
        resources=Resources(
            r.cpu,
            r.memory,
            r.gpus,
            dict(r.node_selector),
            [Toleration(t.key, t.operator, t.value, t.effect) for t in r.tolerations],
        ),
        serving=Serving(
            s.load_in_4bit,
            s.max_queue,
            s.max_new_tokens_limit,
            s.max_batch_size,
            s.image,
            _engine(s.engine),
            list(s.additional_versions),
        ),
        namespace=m.namespace,
        labels=dict(m.labels),
    )


def _condition(c: Condition) -> pb.Condition:
    return pb.Condition(
        type=c.type,
        status=c.status,
        reason=c.reason,
        message=c.message,
        last_transition_time=to_timestamp(c.last_transition_time),
    )


def deployment_to_pb(d: Deployment) -> pb.Deployment:
    r, a, s = d.resources, d.autoscaling, d.serving
    return pb.Deployment(
        name=d.name,
        display_name=d.display_name,
        model_version=d.model_version,
        model_alias=d.model_alias,
        backend=BACKEND_TO_PB[d.backend],
        replicas=d.replicas,
        autoscaling=pb.Autoscaling(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            target_cpu_utilization=a.target_cpu_utilization,
            target_inflight_requests=a.target_inflight_requests,
        ),  # fmt: skip
        resources=pb.Resources(
            cpu=r.cpu,
            memory=r.memory,
            gpus=r.gpus,
            node_selector=r.node_selector,
            tolerations=[pb.Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in r.tolerations],
        ),  # fmt: skip
        serving=pb.ServingConfig(
            load_in_4bit=s.load_in_4bit,
            max_queue=s.max_queue,
            max_new_tokens_limit=s.max_new_tokens_limit,
            max_batch_size=s.max_batch_size,
            image=s.image,
            engine=ENGINE_TO_PB.get(s.engine, pb.ServingConfig.ENGINE_UNSPECIFIED),  # type: ignore[arg-type]
            additional_versions=s.additional_versions,
        ),  # fmt: skip
        namespace=d.namespace,
        labels=d.labels,
        state=STATE_TO_PB[d.state],
        served_version=d.served_version,
        served_model_name=d.served_model_name,
        model_names=d.model_names,
        served_versions=[
            pb.ServedVersion(model_version=v.model_version, served_model_name=v.served_model_name, model_names=v.model_names)
            for v in d.served_versions
        ],
        endpoint=d.endpoint,
        openai_base_url=d.openai_base_url,
        ready_replicas=d.ready_replicas,
        revision=d.revision,
        conditions=[_condition(c) for c in d.conditions],
        create_time=to_timestamp(d.create_time),
        update_time=to_timestamp(d.update_time),
        etag=etag_for(d.name, d.generation),
    )


def revision_to_pb(r: Revision) -> pb.DeploymentRevision:
    return pb.DeploymentRevision(
        name=r.name, revision=r.revision, model_version=r.model_version, cause=r.cause, actor=r.actor,
        create_time=to_timestamp(r.create_time),
    )  # fmt: skip
