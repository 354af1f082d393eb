import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, ChatML template) saved like a real checkpoint."""
    from neuroweaver_ml.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def adapters(tiny_base, tmp_path_factory) -> list[tuple[Path, str]]:
    """Three LoRA adapters (different random weights) on the tiny base: (dir, sha256)."""
    from neuroweaver_ml.testing import make_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(tiny_base, root / f"adapter-{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="session")
def kube_standin():
    from neuroweaver_kube.testing import KubeApiStandIn

    # A local STAND-IN of the Kubernetes API, not a cluster. It runs no pods: auto_ready opts in to reading every
    # Deployment as rolled out, so these tests can see the deployer reach AVAILABLE.
    with KubeApiStandIn(auto_ready=True) as standin:
        yield standin


@pytest.fixture(scope="session")
async def stack(tmp_path_factory, tiny_base, adapters, kube_standin):
    """A real registry and a real deployer (in-process gRPC servers) with three registered versions."""
    from helpers import Stack

    stack = Stack(tmp_path_factory.mktemp("stack"), tiny_base, adapters, kube_standin.url)
    await stack.start()
    yield stack
    await stack.stop()
