"""Registry screens in a real browser against the real registry: models, a model's versions and aliases, compare two
versions (deltas by direction, hyperparameter and lineage diff, recommendation), and an alias move with its history."""

from __future__ import annotations

import hashlib

import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

pytestmark = pytest.mark.slow
MODEL = "projects/default/models/parts-bot"
HIGHER, LOWER = cpb.METRIC_DIRECTION_HIGHER_IS_BETTER, cpb.METRIC_DIRECTION_LOWER_IS_BETTER


def version(n: int, *, accuracy: float, eval_loss: float, lr: str, dataset: str) -> rpb.ModelVersion:
    return rpb.ModelVersion(
        artifact=rpb.Artifact(uri=f"file:///models/parts-bot/{n}", sha256=hashlib.sha256(str(n).encode()).hexdigest()),
        lineage=rpb.Lineage(
            base_model="builtin:smollm2-135m-instruct",
            dataset_uri=dataset,
            method="sft_lora",
            hyperparameters={"learning_rate": lr, "lora_r": "8"},
        ),
        metrics=[
            rpb.Metric(name="accuracy", value=accuracy, direction=HIGHER),
            rpb.Metric(name="eval_loss", value=eval_loss, direction=LOWER),
        ],
    )


@pytest.fixture(scope="module")
async def parts_bot(registry):
    stub = registry.stub
    await stub.CreateModel(
        rsvc.CreateModelRequest(
            parent="projects/default",
            model_id="parts-bot",
            model=rpb.Model(display_name="Parts bot", specialization="parts", base_model="builtin:smollm2-135m-instruct"),
        )
    )
    v1 = await stub.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent=MODEL,
            version="1.0.0",
            model_version=version(1, accuracy=0.70, eval_loss=1.20, lr="2e-4", dataset="file:///d/a.jsonl"),
        )
    )
    v2 = await stub.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent=MODEL,
            version="1.1.0",
            model_version=version(2, accuracy=0.78, eval_loss=1.05, lr="1e-4", dataset="file:///d/b.jsonl"),
        )
    )
    await stub.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="production", version="1.0.0", reason="first release"))
    return v1, v2


async def test_models_and_compare_show_deltas(page, console, parts_bot, h):
    await page.goto(f"{console.url}/models")
    row = page.locator("#models tr", has_text="Parts bot")
    await row.wait_for()
    assert "production → 1.0.0" in await row.inner_text()
    await h.check_screen(page, "models")

    await row.get_by_role("link", name="Parts bot").click()
    await page.wait_for_url("**/models/parts-bot")
    versions = await page.locator("#versions tbody tr td:first-child").all_inner_texts()
    assert versions == ["1.1.0", "1.0.0"]  # semver order, newest first
    await h.check_screen(page, "model")

    # Keyboard: the first Tab reaches the skip link; the compare button is reachable and works with Enter.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.get_by_role("button", name="Compare base with candidate").focus()
    # The defaults: the newest as candidate, the one before as base.
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/compare?**")
    assert "1.0.0 → 1.1.0" in await page.locator("h1").inner_text()
    rows = {}
    for tr in await page.locator("#metric-deltas tbody tr").all():
        cells = await tr.locator("th, td").all_inner_texts()
        rows[cells[0]] = cells
    assert rows["accuracy"] == ["accuracy", "higher is better", "0.7", "0.78", "+0.08", "+11.4%", "improved"]
    assert rows["eval_loss"] == ["eval_loss", "lower is better", "1.2", "1.05", "-0.15", "-12.5%", "improved"]
    hp = await page.locator("#hyperparameter-diffs tbody").inner_text()
    assert "learning_rate" in hp and "2e-4" in hp and "1e-4" in hp and "lora_r" not in hp
    lineage = await page.locator("#lineage-diffs tbody").inner_text()
    assert "dataset_uri" in lineage and "file:///d/b.jsonl" in lineage
    assert "Recommendation:" in await page.locator("#recommendation").inner_text()
    await h.check_screen(page, "compare")

    # The other way round: the same deltas, regressed.
    await page.goto(f"{console.url}/models/parts-bot/compare?base=1.1.0&candidate=1.0.0")
    verdicts = await page.locator("#metric-deltas tbody td:last-child").all_inner_texts()
    assert verdicts == ["regressed", "regressed"]


async def test_alias_move_appears_in_history(page, console, parts_bot, registry, h):
    await page.goto(f"{console.url}/models/parts-bot")
    await page.get_by_role("textbox", name="Alias").fill("production")
    await page.get_by_role("combobox", name="Version").select_option("1.1.0")
    await page.get_by_role("button", name="Review…").click()
    assert "production points at 1.0.0 now; it will point at 1.1.0" in await page.locator("#alias-change").inner_text()
    await page.get_by_label("Reason (kept in the alias history)").fill("better on the parts eval")
    await h.check_screen(page, "alias-confirm")
    await page.get_by_role("button", name="Move production to 1.1.0").click()
    await page.wait_for_url("**/models/parts-bot?moved=production*")
    history = await page.locator("#history-production li").all_inner_texts()
    assert any("1.0.0 → 1.1.0" in e and "better on the parts eval" in e for e in history), history
    alias = await registry.stub.GetModelAlias(rsvc.GetModelAliasRequest(name=f"{MODEL}/aliases/production"))
    assert alias.version == "1.1.0" and alias.reason == "better on the parts eval"


async def test_stale_alias_move_is_refused(page, console, parts_bot, registry):
    """Compare-and-set: the confirmation page carries the version it showed; a move in between wins and the console
    shows the registry's refusal instead of overwriting it."""
    await page.goto(f"{console.url}/models/parts-bot/alias?alias=staging&version=1.0.0")
    await registry.stub.SetModelAlias(
        rsvc.SetModelAliasRequest(model=MODEL, alias="staging", version="1.1.0", reason="someone else")
    )
    await page.get_by_label("Reason (kept in the alias history)").fill("mine")
    await page.get_by_role("button", name="Move staging to 1.0.0").click()
    assert await page.locator("h1").inner_text() in ("The service said ABORTED", "The service said FAILED_PRECONDITION")
    page.errors[:] = [e for e in page.errors if "409" not in e]  # the refusal page's own status, expected
    alias = await registry.stub.GetModelAlias(rsvc.GetModelAliasRequest(name=f"{MODEL}/aliases/staging"))
    assert alias.version == "1.1.0"
