"""Several deployer replicas on one database (issue 16 §1): per-deployment ownership leases with fencing.

Two deployers on one SQLite or PostgreSQL database, Kubernetes backend against a `KubeApiStandIn` (a stand-in of the
API, not a cluster): each deployment is acted on by exactly one replica; a stopped or SIGKILLed owner's deployments
are taken over within the lease time and converge; a replica that lost its lease (paused: its lease loop stopped)
can neither write status nor apply; and a deployment deleted while a stale poller watches it, or while its owner is
mid-apply, is never re-created. Leases of 2 s (renewed every 0.5 s) keep the takeovers short.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import watch_until
from sqlalchemy import text

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver_deployer.domain.model import BackendStatus
from neuroweaver_kube.manifests import dns1123_name
from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.testing import create_postgres_database, free_port

AVAILABLE = dpb.Deployment.STATE_AVAILABLE
NS = "leases"
LEASE = {"lease_seconds": 2.0, "lease_renew_seconds": 0.5}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'deployer.db'}"
        return
    try:
        url, drop = await create_postgres_database("nwdeployerleases")
    except OSError as exc:
        pytest.fail(f"PostgreSQL is not reachable at NW_TEST_POSTGRES_URL: {exc}")
    yield url
    await drop()


@pytest.fixture
def standin():
    with KubeApiStandIn(auto_ready=True) as s:  # Deployments turn Available when read: there are no pods here
        yield s


def config(stack, standin, url, tmp_path, **extra):
    from neuroweaver_deployer.app import DeployerConfig

    return DeployerConfig(
        port=free_port(), metrics_port=-1, data_dir=str(tmp_path), database_url=url,
        registry_target=f"127.0.0.1:{stack.registry.port}", kubernetes=True, kube_api_url=standin.url,
        kube_poll_seconds=0.2, kube_namespace=NS, kube_artifacts_mount_path=str(stack.root.parent), **LEASE, **extra,
    )  # fmt: skip


async def until(check, timeout: float = 30.0, what: str = "condition"):
    """Polls `check` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)


async def leases(url: str) -> dict[str, tuple[str, int]]:
    """name → (lease_owner, lease_epoch) as stored."""
    db = Database(url)
    try:
        async with db.read() as s:
            rows = (await s.execute(text("SELECT name, lease_owner, lease_epoch FROM deployments"))).all()
        return {r.name: (r.lease_owner, r.lease_epoch) for r in rows}
    finally:
        await db.dispose()


def applies(standin, obj: str) -> int:
    """Server-side applies of the model-server Deployment `obj`."""
    return len(
        [
            r
            for r in standin.requests
            if r.method == "PATCH" and r.content_type == "application/apply-patch+yaml" and r.path.endswith(f"/deployments/{obj}")
        ]
    )


async def create(dep, stack, deployment_id: str, replicas: int = 1) -> str:
    d = await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id=deployment_id,
            deployment=dpb.Deployment(
                model_version=stack.versions[0], backend=dpb.BACKEND_KUBERNETES, replicas=replicas, namespace=NS
            ),
        )
    )
    return d.name


class Pair:
    """Two in-process deployer replicas on one database, with a channel to each."""

    def __init__(self, stack, standin, url, tmp_path) -> None:
        from neuroweaver_deployer.app import build

        self.a = build(config(stack, standin, url, tmp_path / "a"))
        self.b = build(config(stack, standin, url, tmp_path / "b"))

    async def __aenter__(self) -> Pair:
        await self.a.start()
        await self.b.start()
        self.ca = grpc.aio.insecure_channel(f"127.0.0.1:{self.a.port}")
        self.cb = grpc.aio.insecure_channel(f"127.0.0.1:{self.b.port}")
        self.da, self.db = dgrpc.DeployerServiceStub(self.ca), dgrpc.DeployerServiceStub(self.cb)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ca.close()
        await self.cb.close()
        for replica in (self.a, self.b):
            await replica.stop()


async def test_each_deployment_has_one_owner_and_a_stopped_owner_hands_over_at_once(stack, standin, db_url, tmp_path):
    async with Pair(stack, standin, db_url, tmp_path) as p:
        names = [await create(p.da if i % 2 else p.db, stack, f"own-{i}") for i in range(4)]
        for name in names:
            await watch_until(p.da, name, lambda d: d.state == AVAILABLE, timeout=30)
        held_a, held_b = set(p.a.controller.leases.held), set(p.b.controller.leases.held)
        assert held_a.isdisjoint(held_b) and held_a | held_b == set(names)
        stored = await leases(db_url)
        for name in names:  # the stored owner is the one replica that holds it, and only its backend polls it
            owner = p.a if name in held_a else p.b
            other = p.b if owner is p.a else p.a
            assert stored[name][0] == owner.controller.owner
            assert name in owner.controller.backends[_kube()]._pollers
            assert name not in other.controller.backends[_kube()]._pollers
        # Either replica answers reads for every deployment.
        listed = await p.db.ListDeployments(dsvc.ListDeploymentsRequest(parent="projects/default"))
        assert {d.name for d in listed.deployments} >= set(names)

        # A graceful stop releases the leases: the survivor takes every deployment over without waiting for expiry
        # (well inside one lease time) and converges a change made through it.
        stopped, survivor, dep = (p.a, p.b, p.db) if held_a else (p.b, p.a, p.da)
        before = {n: stored[n][1] for n in names}
        await stopped.stop()
        await until(lambda: set(survivor.controller.leases.held) >= set(names), timeout=LEASE["lease_seconds"], what="takeover")
        after = await leases(db_url)
        for name in names:
            assert after[name][0] == survivor.controller.owner
            if name not in (held_b if survivor is p.b else held_a):
                assert after[name][1] == before[name] + 1  # the fencing token moved on
        target = names[0]
        await dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=target, replicas=3))
        await watch_until(dep, target, lambda d: d.ready_replicas == 3 and d.state == AVAILABLE, timeout=30)
        assert standin.get_object("apps/v1", "Deployment", NS, dns1123_name(target))["spec"]["replicas"] == 3
        for name in names:
            await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
        assert await leases(db_url) == {}


def _kube():
    from neuroweaver_deployer.domain.model import Backend

    return Backend.KUBERNETES


def _pause(replica, name: str) -> None:
    """As if the replica's process were paused (SIGSTOP, a long GC, cut off from the database): its lease loop and its
    poller of `name` stop, and it keeps believing it owns what it held."""
    replica.controller.leases._task.cancel()
    replica.controller.backends[_kube()]._pollers[name].cancel()
    replica.controller.notifier.controller = None  # deaf to wake-ups and NOTIFYs as well


def _resume_poller(replica, name: str) -> None:
    """The paused process wakes up: its poller of `name` carries on where it stopped."""
    backend = replica.controller.backends[_kube()]
    backend._pollers[name] = asyncio.ensure_future(backend._poll(name))


async def test_a_stale_owner_can_neither_write_status_nor_apply(stack, standin, db_url, tmp_path):
    async with Pair(stack, standin, db_url, tmp_path) as p:
        name = await create(p.da, stack, "fenced")
        await watch_until(p.da, name, lambda d: d.state == AVAILABLE, timeout=30)
        await until(lambda: name in p.a.controller.leases.held or name in p.b.controller.leases.held, what="an owner")
        stale, fresh = (p.a, p.b) if name in p.a.controller.leases.held else (p.b, p.a)
        old_epoch = stale.controller.leases.held[name].epoch
        _pause(stale, name)
        await until(lambda: name in fresh.controller.leases.held, timeout=10, what="takeover after expiry")
        assert fresh.controller.leases.held[name].epoch == old_epoch + 1
        obj = dns1123_name(name)
        await until(lambda: name in fresh.controller.backends[_kube()]._pollers, what="the new owner polling")
        assert name in stale.controller.leases.held  # it still believes it owns the deployment

        # A status report of the stale owner is rejected by the fence (and makes it let go).
        await stale.controller.on_status(name, BackendStatus(desired=1, ready=0, failed=True, message="stale owner"))
        stored = await (p.da if fresh is p.a else p.db).GetDeployment(dsvc.GetDeploymentRequest(name=name))
        assert stored.state == AVAILABLE and all("stale owner" not in c.message for c in stored.conditions)
        assert name not in stale.controller.leases.held
        await until(lambda: name not in stale.controller.backends[_kube()]._pollers, what="the stale poller stopped")

        # A stale apply is refused under the fence: restore the stale belief and ask it to re-apply.
        stale.controller.leases.held[name] = fresh.controller.leases.held[name].__class__(name, old_epoch, 1, False)
        count = applies(standin, obj)
        stale.controller.reapply(name)
        await until(lambda: name not in stale.controller.leases.held, what="the stale owner dropping the lease again")
        assert applies(standin, obj) == count


async def test_a_deleted_deployment_is_not_resurrected_by_a_stale_poller(stack, standin, db_url, tmp_path):
    """The old bug: a poller that got 404 for its Deployment re-applied it, re-creating a deployment another replica
    had just deleted. Now the 404 goes to the controller, whose fenced apply finds the row gone."""
    async with Pair(stack, standin, db_url, tmp_path) as p:
        name = await create(p.da, stack, "ghost")
        await watch_until(p.da, name, lambda d: d.state == AVAILABLE, timeout=30)
        await until(lambda: name in p.a.controller.leases.held or name in p.b.controller.leases.held, what="an owner")
        stale, fresh = (p.a, p.b) if name in p.a.controller.leases.held else (p.b, p.a)
        _pause(stale, name)
        await until(lambda: name in fresh.controller.leases.held, timeout=10, what="takeover after expiry")
        obj = dns1123_name(name)
        dep = p.da if fresh is p.a else p.db
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
        deleted_at = len(standin.requests)
        assert standin.get_object("apps/v1", "Deployment", NS, obj) is None
        # The stale poller wakes, reads the Deployment, gets 404 and hands it to its controller, which lets go of it.
        assert name in stale.controller.leases.held
        _resume_poller(stale, name)
        await until(lambda: name not in stale.controller.leases.held, what="the stale owner letting go")
        await until(lambda: name not in stale.controller.backends[_kube()]._pollers, what="the stale poller stopped")
        assert [r for r in standin.requests[deleted_at:] if r.method in ("PATCH", "POST", "PUT")] == []
        assert standin.get_object("apps/v1", "Deployment", NS, obj) is None
        assert await leases(db_url) == {}


async def test_a_delete_during_the_owners_apply_waits_for_it_and_nothing_is_re_created(stack, standin, db_url, tmp_path):
    async with Pair(stack, standin, db_url, tmp_path) as p:
        name = await create(p.da, stack, "midapply")
        await watch_until(p.da, name, lambda d: d.state == AVAILABLE, timeout=30)
        await until(lambda: name in p.a.controller.leases.held or name in p.b.controller.leases.held, what="an owner")
        owner, other = (p.a, p.b) if name in p.a.controller.leases.held else (p.b, p.a)
        client = owner.controller.backends[_kube()].client
        entered, release = asyncio.Event(), asyncio.Event()
        real_scale = client.scale

        async def slow_scale(*args, **kwargs):  # the owner's apply, held open inside its fenced transaction
            entered.set()
            await release.wait()
            return await real_scale(*args, **kwargs)

        client.scale = slow_scale
        try:
            via_owner = p.da if owner is p.a else p.db
            via_other = p.db if owner is p.a else p.da
            await via_owner.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=name, replicas=2))
            await asyncio.wait_for(entered.wait(), 30)
            deleting = asyncio.ensure_future(via_other.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name)))
            await asyncio.sleep(0.3)  # give the delete time to queue behind the apply's row lock (not needed for correctness)
            release.set()
            await asyncio.wait_for(deleting, 30)
        finally:
            client.scale = real_scale
            release.set()
        obj = dns1123_name(name)
        assert standin.get_object("apps/v1", "Deployment", NS, obj) is None
        assert await leases(db_url) == {}
        mark = len(standin.requests)
        for replica in (owner, other):
            await until(lambda r=replica: name not in r.controller.backends[_kube()]._pollers, what="pollers stopped")
        assert [r for r in standin.requests[mark:] if r.method in ("PATCH", "POST", "PUT")] == []


async def _serving(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="neuroweaver.deployer.v1.DeployerService"), wait_for_ready=True, timeout=60
        )
        async for msg in watch:
            if msg.status == health_pb2.HealthCheckResponse.SERVING:
                return


async def test_a_sigkilled_owner_process_is_taken_over_within_the_lease(stack, standin, db_url, tmp_path):
    """Two real `python -m neuroweaver_deployer` processes; the owner dies without releasing anything."""
    ports = [free_port(), free_port()]
    procs = []
    for i, port in enumerate(ports):
        env = {
            **os.environ,
            "NW_DEPLOYER_PORT": str(port), "NW_DEPLOYER_METRICS_PORT": "-1", "NW_DEPLOYER_DATA_DIR": str(tmp_path / f"p{i}"),
            "NW_DEPLOYER_DATABASE_URL": db_url, "NW_DEPLOYER_REGISTRY_TARGET": f"127.0.0.1:{stack.registry.port}",
            "NW_DEPLOYER_KUBERNETES": "true", "NW_DEPLOYER_KUBE_API_URL": standin.url, "NW_DEPLOYER_KUBE_POLL_SECONDS": "0.2",
            "NW_DEPLOYER_KUBE_NAMESPACE": NS, "NW_DEPLOYER_KUBE_ARTIFACTS_MOUNT_PATH": str(stack.root.parent),
            "NW_DEPLOYER_LEASE_SECONDS": "2", "NW_DEPLOYER_LEASE_RENEW_SECONDS": "0.5",
        }  # fmt: skip
        procs.append(await asyncio.create_subprocess_exec(sys.executable, "-m", "neuroweaver_deployer", env=env))
        await _serving(port)  # one after the other: the first migrates, the second finds head
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        stubs = [dgrpc.DeployerServiceStub(c) for c in channels]
        name = await create(stubs[0], stack, "killed")
        await watch_until(stubs[0], name, lambda d: d.state == AVAILABLE, timeout=30)
        owners = {f"{socket.gethostname()[:80]}-{proc.pid}-": i for i, proc in enumerate(procs)}

        def owner_index(owner: str) -> int | None:
            return next((i for prefix, i in owners.items() if owner.startswith(prefix)), None)

        owner, epoch = (await leases(db_url))[name]
        victim = owner_index(owner)
        assert victim is not None, owner
        survivor = 1 - victim
        procs[victim].send_signal(signal.SIGKILL)
        await procs[victim].wait()

        async def taken_over():
            now = (await leases(db_url))[name]
            return now if owner_index(now[0]) == survivor else None

        new_owner, new_epoch = await until(taken_over, timeout=10, what="takeover by the surviving process")
        assert new_epoch == epoch + 1
        await stubs[survivor].ScaleDeployment(dsvc.ScaleDeploymentRequest(name=name, replicas=2))
        await watch_until(stubs[survivor], name, lambda d: d.ready_replicas == 2 and d.state == AVAILABLE, timeout=30)
        await stubs[survivor].DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
        assert standin.get_object("apps/v1", "Deployment", NS, dns1123_name(name)) is None
        for c in channels:
            await c.close()
        procs[survivor].terminate()
        assert await asyncio.wait_for(procs[survivor].wait(), 30) == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
