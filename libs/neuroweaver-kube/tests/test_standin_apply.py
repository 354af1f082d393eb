"""Server-side apply field ownership of the API stand-in, over HTTP with the project's own KubeClient.

The expected values follow the Kubernetes documentation (reference/using-api/server-side-apply) and the
structured-merge-diff / apiserver sources the stand-in ports (neuroweaver_kube.testing.apply)."""

import pytest
from test_manifests import cpu_spec

from neuroweaver_kube.client import APPLY_PATCH, MERGE_PATCH, KubeApiError, KubeClient, KubeConflict, object_path
from neuroweaver_kube.manifests import model_server_manifests
from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_kube.testing import apply as ssa

NS = "apply"


@pytest.fixture
def standin():
    with KubeApiStandIn() as s:
        yield s


@pytest.fixture
def kube(standin):
    c = KubeClient.from_config(host=standin.url, token="t")
    yield c
    c.close()


def apply(kube, obj, manager, *, force=False):
    query = [("fieldManager", manager)] + ([("force", "true")] if force else [])
    return kube.request("PATCH", object_path(obj), query=query, body=obj, content_type=APPLY_PATCH)


def deployment(*, replicas=None, image="img:1", env=None, containers=None, labels=None):
    container = {"name": "server", "image": image, "ports": [{"containerPort": 8080}]}
    if env is not None:
        container["env"] = env
    spec = {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": containers or [container]}},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    md = {"name": "web", "namespace": NS, **({"labels": labels} if labels else {})}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": md, "spec": spec}


def entry(obj, manager, operation="Apply"):
    (e,) = [e for e in obj["metadata"]["managedFields"] if e["manager"] == manager and e["operation"] == operation]
    return e


def containers(obj):
    return {c["name"]: c for c in obj["spec"]["template"]["spec"]["containers"]}


def test_managed_fields_shape_matches_the_documented_example(kube):
    # The ConfigMap of the "Server-Side Apply" page, applied by kubectl: its managedFields read
    #   fieldsV1: {f:metadata: {f:labels: {f:test-label: {}}}, f:data: {f:key: {}}}
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "test-cm", "namespace": NS, "labels": {"test-label": "test"}},
        "data": {"key": "some value"},
    }
    out = apply(kube, cm, "kubectl")
    (e,) = out["metadata"]["managedFields"]
    assert e.keys() == {"manager", "operation", "apiVersion", "time", "fieldsType", "fieldsV1"}
    assert (e["manager"], e["operation"], e["apiVersion"], e["fieldsType"]) == ("kubectl", "Apply", "v1", "FieldsV1")
    assert e["fieldsV1"] == {"f:metadata": {"f:labels": {"f:test-label": {}}}, "f:data": {"f:key": {}}}


def test_associative_list_items_are_keyed_and_marked(kube):
    out = apply(kube, deployment(replicas=2, env=[{"name": "A", "value": "1"}]), "ci")
    f = entry(out, "ci")["fieldsV1"]
    assert f["f:spec"]["f:replicas"] == {} and f["f:spec"]["f:selector"] == {}  # LabelSelector is atomic
    item = f["f:spec"]["f:template"]["f:spec"]["f:containers"]['k:{"name":"server"}']
    assert (
        item["."] == {}
        and item["f:image"] == {}
        and item["f:env"]['k:{"name":"A"}']
        == {
            ".": {},
            "f:name": {},
            "f:value": {},
        }
    )
    # protocol is part of a port's key and defaults to TCP, as the OpenAPI default says
    assert item["f:ports"] == {'k:{"containerPort":8080,"protocol":"TCP"}': {".": {}, "f:containerPort": {}}}


def test_a_field_the_manager_stops_sending_is_removed(kube, standin):
    apply(kube, deployment(replicas=2, labels={"team": "a", "tier": "web"}, env=[{"name": "A"}, {"name": "B"}]), "ci")
    out = apply(kube, deployment(replicas=2, labels={"team": "a"}, env=[{"name": "A"}]), "ci")
    assert out["metadata"]["labels"] == {"team": "a"}
    assert containers(out)["server"]["env"] == [{"name": "A"}]
    assert 'k:{"name":"B"}' not in str(entry(out, "ci")["fieldsV1"])
    # A whole container the manager stops sending goes too.
    two = [{"name": "server", "image": "img:1"}, {"name": "sidecar", "image": "side:1"}]
    apply(kube, deployment(replicas=2, containers=two), "ci")
    out = apply(kube, deployment(replicas=2, containers=two[:1]), "ci")
    assert list(containers(out)) == ["server"] and "ports" not in containers(out)["server"]
    assert standin.get_object("apps/v1", "Deployment", NS, "web") == out


def test_replicas_nobody_owns_any_more_fall_back_to_the_default(kube):
    apply(kube, deployment(replicas=4), "ci")
    out = apply(kube, deployment(), "ci")  # the manager hands replicas over to nobody: removed, then defaulted
    assert out["spec"]["replicas"] == 1
    assert "f:replicas" not in entry(out, "ci")["fieldsV1"]["f:spec"]


def test_two_managers_share_a_field_with_the_same_value(kube):
    apply(kube, deployment(replicas=2, image="img:1"), "ci")
    out = apply(kube, deployment(replicas=2, image="img:1"), "gitops")  # same values: no conflict, shared
    for manager in ("ci", "gitops"):
        f = entry(out, manager)["fieldsV1"]["f:spec"]
        assert "f:replicas" in f and "f:image" in f["f:template"]["f:spec"]["f:containers"]['k:{"name":"server"}']
    # One sharer stops sending the image: the other still owns it, so it stays.
    out = apply(kube, deployment(replicas=2, containers=[{"name": "server"}]), "gitops")
    assert containers(out)["server"]["image"] == "img:1"
    # Changing a shared field conflicts with the other sharer.
    with pytest.raises(KubeConflict) as e:
        apply(kube, deployment(replicas=5), "gitops")
    assert e.value.body["details"]["causes"] == [
        {"type": "FieldManagerConflict", "message": 'conflict with "ci"', "field": ".spec.replicas"}
    ]


def test_conflict_without_force_and_ownership_moves_with_force(kube):
    before = apply(kube, deployment(replicas=2, image="img:1"), "ci")
    with pytest.raises(KubeConflict) as e:
        apply(kube, deployment(replicas=3, image="img:2"), "hotfix")
    err = e.value
    assert (err.code, err.reason) == (409, "Conflict") and err.body["status"] == "Failure"
    assert err.message == (
        'Apply failed with 2 conflicts: conflicts with "ci":\n'
        "- .spec.replicas\n"
        '- .spec.template.spec.containers[name="server"].image'
    )
    assert {c["field"] for c in err.body["details"]["causes"]} == {
        ".spec.replicas",
        '.spec.template.spec.containers[name="server"].image',
    }
    assert apply(kube, deployment(replicas=2, image="img:1"), "ci") == before  # nothing was written
    out = apply(kube, deployment(replicas=3, image="img:2"), "hotfix", force=True)
    assert out["spec"]["replicas"] == 3 and containers(out)["server"]["image"] == "img:2"
    ci = entry(out, "ci")["fieldsV1"]["f:spec"]
    assert "f:replicas" not in ci and "f:image" not in ci["f:template"]["f:spec"]["f:containers"]['k:{"name":"server"}']
    # The old owner no longer owns them: it may stop sending them without removing the hotfix's values.
    out = apply(kube, deployment(containers=[{"name": "server"}]), "ci")
    assert out["spec"]["replicas"] == 3 and containers(out)["server"]["image"] == "img:2"


def test_scale_subresource_owns_replicas_like_an_hpa(kube, standin):
    apply(kube, deployment(replicas=2), "ci")
    path = object_path(deployment()) + "/scale"
    kube.request(
        "PATCH", path, query=[("fieldManager", "hpa")], body={"spec": {"replicas": 7}}, content_type=MERGE_PATCH
    )
    out = apply(kube, deployment(), "ci")  # the applier omits replicas: the scaler's value stays
    assert out["spec"]["replicas"] == 7
    (scaler,) = [e for e in out["metadata"]["managedFields"] if e.get("subresource") == "scale"]
    assert (scaler["manager"], scaler["operation"], scaler["fieldsV1"]) == (
        "hpa",
        "Update",
        {"f:spec": {"f:replicas": {}}},
    )
    with pytest.raises(KubeConflict) as e:
        apply(kube, deployment(replicas=2), "ci")
    assert e.value.message.startswith(
        'Apply failed with 1 conflict: conflict with "hpa" with subresource "scale" using apps/v1: .spec.replicas'
    )


def test_merge_patch_is_an_update_that_takes_changed_fields(kube):
    apply(kube, deployment(replicas=2, labels={"team": "a"}), "ci")
    patched = kube.request(
        "PATCH", object_path(deployment()), body={"metadata": {"labels": {"team": "b"}}}, content_type=MERGE_PATCH
    )
    # no fieldManager: the API server names the manager after the User-Agent (the Python client's)
    upd = entry(patched, "OpenAPI-Generator", "Update")
    assert upd["fieldsV1"] == {"f:metadata": {"f:labels": {"f:team": {}}}} and upd["apiVersion"] == "apps/v1"
    assert "f:metadata" not in entry(patched, "ci")["fieldsV1"]  # the applier lost the label it no longer set
    # Apply entries first, then Update entries (the controller's status write is one too)
    ops = [(e["operation"], e["manager"], e.get("subresource")) for e in patched["metadata"]["managedFields"]]
    assert ops[0] == ("Apply", "ci", None) and set(ops[1:]) == {
        ("Update", "OpenAPI-Generator", None),
        ("Update", "kube-controller-manager", "status"),
    }
    with pytest.raises(KubeConflict) as e:
        apply(kube, deployment(replicas=2, labels={"team": "a"}), "ci")
    assert '"OpenAPI-Generator" using apps/v1' in e.value.message and ".metadata.labels.team" in e.value.message


def test_noop_apply_changes_nothing_and_generation_follows_the_spec(kube):
    first = apply(kube, deployment(replicas=2), "ci")
    again = apply(kube, deployment(replicas=2), "ci")
    assert again == first  # same resourceVersion, generation, managedFields (and their time)
    relabelled = apply(kube, deployment(replicas=2, labels={"team": "a"}), "ci")
    md = relabelled["metadata"]
    assert md["generation"] == 1 and int(md["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert apply(kube, deployment(replicas=3, labels={"team": "a"}), "ci")["metadata"]["generation"] == 2


def test_resource_version_is_a_precondition(kube):
    out = apply(kube, deployment(replicas=2), "ci")
    stale = deployment(replicas=3)
    stale["metadata"]["resourceVersion"] = str(int(out["metadata"]["resourceVersion"]) - 1)
    with pytest.raises(KubeConflict) as e:
        kube.request("PUT", object_path(stale), body=stale)
    assert "the object has been modified" in e.value.message
    stale["metadata"]["resourceVersion"] = out["metadata"]["resourceVersion"]
    put = kube.request("PUT", object_path(stale), body=stale)
    assert put["spec"]["replicas"] == 3 and entry(put, "OpenAPI-Generator", "Update")


def test_another_managers_container_and_env_survive(kube):
    apply(kube, deployment(replicas=1, env=[{"name": "A", "value": "1"}]), "ci")
    # a second applier adds a sidecar and an env var of its own to the server container
    mine = [{"name": "server", "env": [{"name": "MESH", "value": "on"}]}, {"name": "proxy", "image": "mesh:1"}]
    apply(kube, deployment(containers=mine), "mesh")
    out = apply(kube, deployment(replicas=1, env=[{"name": "A", "value": "2"}]), "ci")
    assert list(containers(out)) == ["server", "proxy"]
    assert containers(out)["server"]["env"] == [{"name": "A", "value": "2"}, {"name": "MESH", "value": "on"}]
    out = apply(kube, deployment(containers=mine[1:]), "mesh")  # the mesh stops sending its env var
    assert containers(out)["server"]["env"] == [{"name": "A", "value": "2"}]


def test_invalid_associative_lists_are_422(kube):
    dup = deployment(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}])
    with pytest.raises(KubeApiError) as e:
        apply(kube, dup, "ci")
    assert (e.value.code, e.value.reason) == (422, "Invalid")
    assert e.value.message == (
        "failed to create typed patch object (apps/v1, Kind=Deployment): "
        '.spec.template.spec.containers[name="server"].env: duplicate entries for key [name="A"]'
    )
    keyless = deployment(containers=[{"image": "img:1"}])
    with pytest.raises(KubeApiError) as e:
        apply(kube, keyless, "ci")
    assert e.value.code == 422 and "omits all key fields" in e.value.message


async def test_kube_client_force_apply_against_the_standin(standin, kube):
    """The platform's own client applies with force=true as manager "neuroweaver": it takes fields back from
    whoever changed them (a kubectl scale, an edit) and never fails on a conflict."""
    spec = cpu_spec()
    objs = model_server_manifests(spec)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == spec.replicas  # not autoscaled: the manifest owns the count
    await kube.apply(objs)
    path = object_path(dep) + "/scale"
    kube.request(
        "PATCH", path, query=[("fieldManager", "kubectl")], body={"spec": {"replicas": 5}}, content_type=MERGE_PATCH
    )
    server = dep["spec"]["template"]["spec"]["containers"][0]
    edited = {"spec": {"template": {"spec": {"containers": [{"name": server["name"], "image": "evil:1"}]}}}}
    edit = [("fieldManager", "kubectl-edit")]
    kube.request("PATCH", object_path(dep), query=edit, body=edited, content_type=MERGE_PATCH)
    stored = await kube.apply(objs)
    out = stored[[o["kind"] for o in objs].index("Deployment")]
    assert out["spec"]["replicas"] == spec.replicas
    assert (
        out["spec"]["template"]["spec"]["containers"][0]["image"]
        == dep["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    managers = {(e["manager"], e["operation"], e.get("subresource", "")) for e in out["metadata"]["managedFields"]}
    assert ("neuroweaver", "Apply", "") in managers and ("kubectl", "Update", "scale") not in managers
    # Re-applying the same manifests is a no-op for every object.
    again = await kube.apply(objs)
    assert [o["metadata"]["resourceVersion"] for o in again] == [o["metadata"]["resourceVersion"] for o in stored]


def test_pure_helpers():
    path = ("f:spec", "f:ports", 'k:{"port":80,"protocol":"TCP"}', "f:targetPort")
    assert ssa.path_string(path) == '.spec.ports[port=80,protocol="TCP"].targetPort'
    fields = {("f:a",), ("f:a", "f:b"), ("f:c", 'v:"x"')}
    tree = ssa.fields_v1(fields)
    assert tree == {"f:a": {".": {}, "f:b": {}}, "f:c": {'v:"x"': {}}}
    assert ssa.parse_fields_v1(tree) == fields
    # list merge: live items keep their place, new config items follow
    t = ssa.ListMap(("name",))
    live = [{"name": "a"}, {"name": "x"}]
    assert ssa.merge(live, [{"name": "a", "v": 1}, {"name": "b"}], t) == [
        {"name": "a", "v": 1},
        {"name": "x"},
        {"name": "b"},
    ]
