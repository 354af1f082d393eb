"""The audit screen in a real browser against the real registry: the event history newest first, a new event arriving
live (WatchModelEvents → server-sent events) without a reload, filters by model, action and actor (live events
filtered too), and bad filters."""

from __future__ import annotations

import hashlib

import pytest

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

pytestmark = pytest.mark.slow
MODEL = "projects/default/models/audit-bot"


@pytest.fixture(scope="module")
async def audit_bot(registry):
    stub = registry.stub
    await stub.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="audit-bot", model=rpb.Model(display_name="Audit bot"))
    )
    for n, version in enumerate(("1.0.0", "1.1.0")):
        await stub.CreateModelVersion(
            rsvc.CreateModelVersionRequest(
                parent=MODEL,
                version=version,
                model_version=rpb.ModelVersion(
                    artifact=rpb.Artifact(
                        uri=f"file:///models/audit-bot/{n}", sha256=hashlib.sha256(version.encode()).hexdigest(),
                        format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER,
                    )
                ),
            )
        )  # fmt: skip
    return stub


def rows(page):
    return page.locator("#audit-events tbody tr:not(#audit-empty)")


async def cells(row) -> list[str]:
    return await row.locator("td").all_inner_texts()


async def wait_live(page) -> None:
    """The EventSource is open (events sent after this reach the page)."""
    await page.wait_for_function("document.body.dataset.live === '1'")


async def test_history_newest_first_and_a_live_event(page, console, audit_bot, h):
    await page.goto(f"{console.url}/audit")
    await wait_live(page)
    seqs = [int(s) for s in await rows(page).evaluate_all("trs => trs.map(tr => tr.dataset.seq)")]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) >= 3
    newest = await cells(rows(page).first)
    assert newest[2] == "audit-bot / version 1.1.0" and newest[3] == "version created" and "version 1.1.0" in newest[4]
    created = rows(page).filter(has_text="model created").filter(has_text="audit-bot")
    assert await created.count() == 1
    assert (
        await rows(page).first.get_by_role("link", name="version 1.1.0").get_attribute("href")
        == "/models/audit-bot/versions/1.1.0"
    )

    await page.evaluate("window.notReloaded = true")
    await audit_bot.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="canary", version="1.1.0", reason="live check"))
    top = rows(page).first
    await top.filter(has_text="alias canary").wait_for(timeout=10_000)
    time_, actor, what, action, details = await cells(top)
    assert (what, action) == ("audit-bot / alias canary", "alias set") and time_.endswith("UTC") and actor
    assert "reason live check" in details and "to_version 1.1.0" in details
    assert await page.evaluate("window.notReloaded") is True
    assert "1 new event" in await page.locator("#audit-live").inner_text()
    await h.check_screen(page, "audit")


async def test_filters_narrow_the_history_and_the_live_stream(page, console, audit_bot, h):
    await page.goto(f"{console.url}/audit")
    everything = await rows(page).count()
    await page.get_by_label("Model").select_option("audit-bot")
    await page.get_by_label("Action").select_option(label="alias set")
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url("**/audit?model=audit-bot&type=alias_set&actor=")
    await wait_live(page)
    assert 1 <= await rows(page).count() < everything
    for row in await rows(page).all():
        what, action = (await cells(row))[2:4]
        assert what.startswith("audit-bot / alias ") and action == "alias set"
    # Live events are filtered too: a label change (version updated) is not shown, the alias move after it is.
    await audit_bot.UpdateModelVersion(
        rsvc.UpdateModelVersionRequest(
            model_version=rpb.ModelVersion(name=f"{MODEL}/versions/1.0.0", labels={"k": "v"}), update_mask={"paths": ["labels"]}
        )
    )
    await audit_bot.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="filtered", version="1.0.0", reason="seen"))
    await rows(page).first.filter(has_text="alias filtered").wait_for(timeout=10_000)
    assert await rows(page).filter(has_text="version updated").count() == 0

    actor = (await cells(rows(page).first))[1]
    await page.get_by_label("Actor").fill(actor)
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url("**actor=*")
    assert await rows(page).count() >= 1
    assert {(await cells(row))[1] for row in await rows(page).all()} == {actor}
    await page.get_by_label("Actor").fill("nobody-at-all")
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url("**actor=nobody-at-all")
    assert await rows(page).count() == 0
    assert await page.locator("#audit-empty").inner_text() == "No events match this filter yet."


async def test_bad_filters(page, console, audit_bot):
    response = await page.goto(f"{console.url}/audit?model=no-such-model")
    assert response is not None and response.status == 404
    assert "no-such-model" in await page.locator("[role=alert]").inner_text()
    response = await page.goto(f"{console.url}/audit?type=drop_table")
    assert response is not None and response.status == 400
    assert "unknown event type 'drop_table'" in await page.locator("[role=alert]").inner_text()
    page.errors[:] = [e for e in page.errors if "404" not in e and "400" not in e]  # the pages' own status, expected
