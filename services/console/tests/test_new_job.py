"""The new-job form in a real browser against a real trainer: a refused form comes back with the person's values and
each violation next to its field; "check" shows the same request as an `nw` command (run through the real CLI's
parser and handler, it sends the request the console sends) and a grpcurl call (its JSON parses into that request),
plus the dataset's first rows; a created tiny job opens its page, runs, and shows its stage timeline and dataset."""

from __future__ import annotations

import shlex

import aiohttp
import pytest
from google.protobuf import json_format

from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb

pytestmark = pytest.mark.slow


async def fill(page, values: dict[str, str]) -> None:
    for name, value in values.items():
        await page.fill(f"#{name}", value)


def valid(tiny_model, data_root, **overrides) -> dict[str, str]:
    values = {
        "base_model": tiny_model,
        "dataset_uri": (data_root / "chat.jsonl").as_uri(),
        "target_model": "advisor",
        "max_steps": "3",
        "batch_size": "2",
        "max_seq_length": "64",
        "learning_rate": "0.001",
        "lora_r": "4",
        "lora_alpha": "8",
    }
    values.update(overrides)
    return values


async def field_error(page, name: str) -> str:
    """The error shown next to a field, after checking that the input points at it and is marked invalid."""
    field = page.locator(f"#{name}")
    assert await field.get_attribute("aria-invalid") == "true"
    assert f"{name}-error" in (await field.get_attribute("aria-describedby") or "").split()
    return await page.locator(f"#{name}-error").inner_text()


async def test_a_refused_form_keeps_its_values_and_shows_each_violation(page, console, trainer, data_root, tiny_model, h,
                                                                        tmp_path):  # fmt: skip
    outside = tmp_path / "outside.jsonl"
    outside.write_text((data_root / "chat.jsonl").read_text())
    await page.goto(f"{console.url}/jobs")
    await page.get_by_role("link", name="New training job").click()
    await page.wait_for_url("**/jobs/new")
    await h.check_screen(page, "new-job")

    await fill(page, valid(tiny_model, data_root, learning_rate="-1", dataset_uri=outside.as_uri(), display_name="refused"))
    await page.keyboard.press("Enter")  # from the last field: Enter creates, the form's first button
    await page.locator("#error-summary").wait_for()
    assert "learning_rate must be in [0, 1]" in await field_error(page, "learning_rate")
    assert await page.locator("#error-summary a[href='#learning_rate']").count() == 1
    assert await page.evaluate("document.activeElement.id") == "error-summary"
    for name, value in valid(tiny_model, data_root, learning_rate="-1", dataset_uri=outside.as_uri()).items():
        assert await page.locator(f"#{name}").input_value() == value, name
    await h.check_screen(page, "new-job-refused")

    # Fixed the learning rate: the trainer's next finding is the dataset outside its roots, said next to that field.
    await page.fill("#learning_rate", "0.001")
    await page.get_by_role("button", name="Create job").click()
    await page.locator("#dataset_uri-error").wait_for()
    error = await field_error(page, "dataset_uri")
    assert "outside the directories" in error and str(tmp_path) not in error
    assert await page.locator("#learning_rate").get_attribute("aria-invalid") is None
    assert await page.locator("#dataset_uri").input_value() == outside.as_uri()
    listed = await trainer.stub.ListTrainingJobs(tsvc.ListTrainingJobsRequest(parent="projects/default", page_size=1000))
    assert "refused" not in [j.display_name for j in listed.training_jobs]
    page.errors[:] = [e for e in page.errors if "400" not in e]  # the refused form's own status, expected


async def test_check_shows_commands_that_make_the_same_request_and_the_dataset(page, console, data_root, tiny_model, h):
    from neuroweaver_sdk.cli import Ctx, build_parser, train_start

    await page.goto(f"{console.url}/jobs/new")
    await fill(page, valid(tiny_model, data_root, training_job_id="cmd-check", display_name="Bob's job", priority="5"))
    await page.get_by_label("QLoRA: train on the base quantized to 4-bit").check()
    await page.get_by_role("button", name="Check, preview the dataset, show as command").click()
    await page.locator("#check-ok").wait_for()
    assert "sha256" in await page.locator("#check-ok").inner_text()

    # grpcurl: its -d argument (through the shell's quoting) is proto3 JSON of the request.
    grpcurl = shlex.split(await page.locator("#grpcurl-command").inner_text())
    assert grpcurl[0] == "grpcurl" and grpcurl[-1] == "neuroweaver.trainer.v1.TrainerService/CreateTrainingJob"
    body = json_format.Parse(grpcurl[grpcurl.index("-d") + 1], tsvc.CreateTrainingJobRequest())
    job = body.training_job
    assert (body.parent, body.training_job_id, job.display_name) == ("projects/default", "cmd-check", "Bob's job")
    assert job.method == tpb.TRAINING_METHOD_SFT_QLORA and job.target_model == "projects/default/models/advisor"
    assert (job.hyperparameters.max_steps, job.hyperparameters.learning_rate, job.lora.r, job.priority) == (3, 1e-3, 4, 5)

    # nw: the real CLI parses the command, and its handler sends the same request.
    argv = shlex.split(await page.locator("#nw-command").inner_text())
    assert argv[:1] == ["nw"]
    sent = []

    class Trainer:
        async def CreateTrainingJob(self, request):
            sent.append(request)
            return request.training_job

    class Clients:
        trainer = Trainer()

    args = build_parser().parse_args(["-q", *argv[1:]])
    assert args.fn is train_start
    await train_start(Ctx(args, Clients()))  # type: ignore[arg-type]
    assert sent[0].request_id  # the CLI's own
    sent[0].ClearField("request_id")
    assert without_empty(json_format.MessageToDict(sent[0])) == without_empty(json_format.MessageToDict(body))

    rows = page.locator("#dataset-rows tbody tr")
    assert await rows.count() == 5
    assert "What is" in await rows.first.inner_text() and "64 rows (chat)" in await page.locator("#dataset-summary").inner_text()
    await h.check_screen(page, "new-job-check")


def without_empty(value):
    """JSON with empty objects left out (the CLI sends empty `resources`/`labels` messages the form leaves unset)."""
    if isinstance(value, dict):
        kept = {k: without_empty(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v != {}}
    return value


async def test_a_created_job_runs_and_its_page_shows_stages_and_dataset(page, console, trainer, data_root, tiny_model, h):
    await page.goto(f"{console.url}/jobs/new")
    await fill(page, valid(tiny_model, data_root, training_job_id="from-form", display_name="from the form"))
    await page.get_by_role("button", name="Create job").click()
    await page.wait_for_url("**/jobs/from-form")
    await page.locator("#dataset-rows tbody tr").first.wait_for()
    assert await page.locator("#dataset-rows tbody tr").count() == 5
    assert "the digest recorded when the job was created" in await page.locator("#dataset-summary").inner_text()

    await page.wait_for_selector("body[data-stream-ended='1']", timeout=180_000)
    job = await trainer.stub.GetTrainingJob(tsvc.GetTrainingJobRequest(name="projects/default/trainingJobs/from-form"))
    assert job.state == tpb.TrainingJob.STATE_SUCCEEDED, job.error
    sft = page.locator("#stage-sft")
    assert (await sft.locator("td").nth(0).inner_text()) == "completed"
    assert "so far" not in await sft.locator("td").nth(3).inner_text()
    assert await page.locator("#stages tbody tr").count() >= 2  # sft, then register

    # The events list filters by stage and type.
    await page.select_option("#events-stage", "sft")
    visible = await page.locator("#events li:visible").all_inner_texts()
    assert visible and all("[sft]" in t for t in visible)
    await page.select_option("#events-stage", "")
    await page.select_option("#events-type", "state changed")
    visible = await page.locator("#events li:visible").all_inner_texts()
    assert visible and all("state changed" in t for t in visible) and any("succeeded" in t for t in visible)
    await page.select_option("#events-type", "")
    await h.check_screen(page, "job-stages")


async def test_a_double_submit_creates_one_job(console, trainer, data_root, tiny_model):
    """The form's request id goes to CreateTrainingJob: the same form posted twice opens the same job."""
    form = {"request_id": "6f1c1a43-8f6b-4c0e-9d55-1f8f5a0b2c11", "method": "sft", "version_bump": "minor",
            **valid(tiny_model, data_root, max_steps="1", display_name="twice")}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        locations = []
        for _ in range(2):
            async with http.post(f"{console.url}/jobs/new", data=form, allow_redirects=False) as resp:
                assert resp.status == 303, await resp.text()
                locations.append(resp.headers["Location"])
    assert locations[0] == locations[1] and locations[0].startswith("/jobs/tj-")
    listed = await trainer.stub.ListTrainingJobs(tsvc.ListTrainingJobsRequest(parent="projects/default", page_size=1000))
    assert [j.display_name for j in listed.training_jobs].count("twice") == 1
    name = f"projects/default/trainingJobs/{locations[0].rsplit('/', 1)[-1]}"
    await trainer.stub.CancelTrainingJob(tsvc.CancelTrainingJobRequest(name=name))  # nothing more to see: free the worker
