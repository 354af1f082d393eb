"""Real services in process (registry, trainer with real worker subprocesses), the console on a free port, and a real
browser: Debian's chromium driven by Playwright. Every page a test opens is checked for console errors; `h.visit`
also saves a screenshot and runs axe-core on it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver_runtime.client import open_channel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = Path(os.environ.get("NW_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "console"
AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        rows.append({"messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]})  # fmt: skip
    return rows


async def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def chromium_path() -> str:
    path = os.environ.get("NW_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing on CI: .ci/run installs it with apt-get")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from neuroweaver_ml import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(64)), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
async def registry(tmp_path_factory):
    from neuroweaver_registry.app import RegistryConfig, build

    service = build(
        RegistryConfig(port=0, metrics_port=-1, data_dir=str(tmp_path_factory.mktemp("registry")), shutdown_grace_seconds=1)
    )
    service.port = 0
    port = await service.start()
    channel = open_channel(f"127.0.0.1:{port}")
    stub = rgrpc.RegistryServiceStub(channel)
    await stub.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="advisor", model=rpb.Model(display_name="Service advisor"))
    )
    yield SimpleNamespace(target=f"127.0.0.1:{port}", stub=stub)
    await channel.close()
    await service.stop()


@pytest.fixture(scope="session")
async def trainer(tmp_path_factory, data_root, registry, tiny_model):
    from neuroweaver_trainer.app import TrainerConfig, build

    tmp = tmp_path_factory.mktemp("trainer")
    service = build(
        TrainerConfig(
            port=0,
            metrics_port=-1,
            data_dir=str(tmp / "data"),
            dataset_roots=str(data_root),
            registry_target=registry.target,
            lease_seconds=4.0,
            heartbeat_seconds=0.5,
            queue_poll_seconds=0.5,
            watch_poll_seconds=0.1,
            registry_retry_seconds=30.0,
            cancel_grace_seconds=10.0,
            shutdown_grace_seconds=2.0,
            model_cache_dir=str(tmp / "models"),
            model_roots=str(Path(tiny_model).parent),
        )  # fmt: skip
    )
    service.port = 0
    port = await service.start()
    channel = open_channel(f"127.0.0.1:{port}")
    yield SimpleNamespace(target=f"127.0.0.1:{port}", stub=tgrpc.TrainerServiceStub(channel))
    await channel.close()
    await service.stop()


@pytest.fixture(scope="session")
async def deployer(tmp_path_factory, registry):
    """The deployer on its LOCAL backend: a deployment is model-server processes on this machine."""
    from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
    from neuroweaver_deployer.app import DeployerConfig, build

    service = build(
        DeployerConfig(
            port=0, metrics_port=-1, data_dir=str(tmp_path_factory.mktemp("deployer")), registry_target=registry.target
        )
    )
    service.port = 0
    port = await service.start()
    channel = open_channel(f"127.0.0.1:{port}")
    yield SimpleNamespace(target=f"127.0.0.1:{port}", stub=dgrpc.DeployerServiceStub(channel), service=service)
    await channel.close()
    await service.stop()


@pytest.fixture(scope="session")
async def experiments(tmp_path_factory, registry, deployer):
    from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
    from neuroweaver_experiments.app import ExperimentsConfig, build

    tmp = tmp_path_factory.mktemp("experiments")
    service = build(
        ExperimentsConfig(
            port=0,
            metrics_port=-1,
            database_url=f"sqlite+aiosqlite:///{tmp}/experiments.db",
            deployer_target=deployer.target,
            registry_target=registry.target,
        )
    )
    service.port = 0
    port = await service.start()
    channel = open_channel(f"127.0.0.1:{port}")
    yield SimpleNamespace(target=f"127.0.0.1:{port}", stub=egrpc.ExperimentsServiceStub(channel), service=service)
    await channel.close()
    await service.stop()


@pytest.fixture(scope="session")
async def console(registry, trainer, deployer, experiments):
    from neuroweaver_console.app import Console
    from neuroweaver_console.config import ConsoleConfig

    app = Console(
        ConsoleConfig(
            port=0,
            metrics_port=0,
            registry_target=registry.target,
            trainer_target=trainer.target,
            deployer_target=deployer.target,
            experiments_target=experiments.target,
        )
    )
    await app.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{app.port}", metrics_url=f"http://127.0.0.1:{app.metrics_port}", app=app)
    await app.stop()


@pytest.fixture(scope="session")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        browser = await pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser, console):
    """A fresh page (1366x900, a laptop screen) whose console errors and uncaught exceptions fail the test."""
    context = await browser.new_context(viewport={"width": 1366, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.errors = errors
    yield page
    await context.close()
    assert errors == [], errors


async def check_screen(page, name: str) -> None:
    """A screenshot to the artifacts dir, and axe-core's verdict: no serious or critical violation."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    await page.evaluate(AXE.read_text())  # evaluated over the devtools protocol: the console's CSP stays on
    result = await page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert bad == [], f"{name}: {bad}"


@pytest.fixture(scope="session")
def h():
    return SimpleNamespace(wait_for=wait_for, check_screen=check_screen, ARTIFACTS=ARTIFACTS)
