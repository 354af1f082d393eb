"""Training screens in a real browser against a real trainer (worker subprocesses training a tiny model): the jobs
list, the job page whose loss curve grows from WatchTrainingJob over server-sent events while the job runs, the
actions (checkpoint, pause, resume, cancel), and the worker's log (for an operator; a viewer is told why not)."""

from __future__ import annotations

import aiohttp
import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb

pytestmark = pytest.mark.slow
RUNNING = tpb.TrainingJob.STATE_RUNNING


def job(data_root, tiny_model, *, steps: int, eval_every: int, name: str) -> tsvc.CreateTrainingJobRequest:
    return tsvc.CreateTrainingJobRequest(
        parent="projects/default",
        training_job=tpb.TrainingJob(
            display_name=name,
            base_model=tiny_model,
            dataset_uri=(data_root / "chat.jsonl").as_uri(),
            method=tpb.TRAINING_METHOD_SFT_LORA,
            target_model="projects/default/models/advisor",
            version_bump=cpb.VERSION_BUMP_MINOR,
            lora=tpb.LoraConfig(r=4, alpha=8),
            hyperparameters=tpb.Hyperparameters(
                max_steps=steps,
                batch_size=2,
                max_seq_length=64,
                checkpoint_every_steps=1000,
                eval_interval_steps=eval_every,
                eval_fraction=0.1,
                learning_rate=1e-3,
            ),
        ),
    )


async def points(page) -> int:
    return int(await page.locator("#loss-chart").get_attribute("data-points") or 0)


async def test_curve_grows_while_the_job_runs(page, console, trainer, data_root, tiny_model, h):
    created = await trainer.stub.CreateTrainingJob(job(data_root, tiny_model, steps=80, eval_every=20, name="curve"))
    job_id = created.name.rsplit("/", 1)[-1]

    await page.goto(f"{console.url}/jobs")
    row = page.locator("#jobs tr", has_text="curve")
    await row.wait_for()
    await h.check_screen(page, "jobs")
    await row.get_by_role("link", name="curve").click()
    await page.wait_for_url(f"**/jobs/{job_id}")
    assert "max_steps" in await page.locator("#hyperparameters").inner_text()

    # Samples of the chart while the trainer reports the job running: the count of points must rise between them.
    samples: list[int] = []

    async def running_sample():
        state = (await trainer.stub.GetTrainingJob(tsvc.GetTrainingJobRequest(name=created.name))).state
        if state == RUNNING:
            n = await points(page)
            if n and (not samples or n != samples[-1]):
                samples.append(n)
        elif state in (tpb.TrainingJob.STATE_SUCCEEDED, tpb.TrainingJob.STATE_FAILED):
            return True
        return len(samples) >= 3

    await h.wait_for(running_sample, timeout=240, interval=0.3, what="the curve to grow while the job runs")
    assert len(samples) >= 3 and samples == sorted(samples) and samples[0] < samples[-1], samples
    await h.check_screen(page, "job-running")

    # To the end: the stream says `end`, every step is on the chart, the events list has the eval and the state changes.
    await page.wait_for_selector("body[data-stream-ended='1']", timeout=240_000)
    final = await trainer.stub.GetTrainingJob(tsvc.GetTrainingJobRequest(name=created.name))
    assert final.state == tpb.TrainingJob.STATE_SUCCEEDED, final.error
    assert await points(page) >= 80  # one loss point per step, plus the eval points
    events = await page.locator("#events").inner_text()
    assert "eval" in events and "succeeded" in events
    assert await page.locator("#job-state").inner_text() == "succeeded"
    await h.check_screen(page, "job-finished")

    # A page opened after the end replays the whole history from the stream.
    await page.reload()
    await page.wait_for_selector("body[data-stream-ended='1']")
    assert await points(page) >= 80

    # The browser's reconnect (Last-Event-ID) resumes after that event, then the stream ends.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{console.url}/jobs/{job_id}/events", headers={"Last-Event-ID": "5"}) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            body = await resp.text()
    ids = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
    assert ids[0] == 6 and ids == list(range(6, 6 + len(ids))) and body.endswith("event: end\ndata: {}\n\n")


async def test_actions_checkpoint_pause_resume_cancel(page, console, trainer, data_root, tiny_model, h):
    created = await trainer.stub.CreateTrainingJob(job(data_root, tiny_model, steps=5000, eval_every=1000, name="actions"))
    job_id = created.name.rsplit("/", 1)[-1]
    await page.goto(f"{console.url}/jobs/{job_id}")

    async def running_with_steps():
        return await points(page) > 2

    await h.wait_for(running_with_steps, timeout=180, what="the job to train")
    await page.reload()  # the buttons follow the job's state at page load
    await page.get_by_role("button", name="Checkpoint").click()
    await page.wait_for_url("**?done=checkpoint")
    await page.locator("#events li", has_text="checkpoint").first.wait_for(timeout=60_000)

    await page.get_by_role("button", name="Pause").click()
    await page.wait_for_url("**?done=pause")
    await page.locator("#job-state", has_text="paused").wait_for(timeout=60_000)
    await page.reload()
    await h.check_screen(page, "job-paused")
    await page.get_by_role("button", name="Resume").click()
    await page.wait_for_url("**?done=resume")
    await page.locator("#events li", has_text="resumed").first.wait_for(timeout=120_000)

    page.once("dialog", lambda dialog: dialog.accept())  # the confirmation before cancelling
    await page.reload()
    await page.get_by_role("button", name="Cancel").click()
    await page.wait_for_url("**?done=cancel")
    await page.wait_for_selector("body[data-stream-ended='1']", timeout=120_000)
    final = await trainer.stub.GetTrainingJob(tsvc.GetTrainingJobRequest(name=created.name))
    assert final.state == tpb.TrainingJob.STATE_CANCELLED


async def test_job_logs_show_the_workers_output_while_it_runs(page, console, trainer, data_root, tiny_model, h):
    """The job page's log section: the worker's own lines (its start line names the attempt and the job), read while
    the job runs and to its end, in a keyboard-reachable region."""
    created = await trainer.stub.CreateTrainingJob(job(data_root, tiny_model, steps=30, eval_every=1000, name="logs"))
    await page.goto(f"{console.url}/jobs/{created.name.rsplit('/', 1)[-1]}")
    logs = page.locator("#logs-text")
    await logs.get_by_text(f"attempt 1 of {created.name} starts").wait_for(timeout=120_000)
    assert await logs.get_attribute("tabindex") == "0" and await logs.get_attribute("aria-label")
    assert (await page.locator("#logs-status").inner_text()).startswith("Attempt 1 of 1 (local), job ")
    assert await page.locator("#logs-attempt-field").is_hidden()  # one attempt: nothing to choose
    await logs.focus()
    await h.check_screen(page, "job-logs")
    await page.wait_for_selector("body[data-stream-ended='1']", timeout=240_000)
    await page.locator("#logs-status", has_text="job succeeded").wait_for(timeout=30_000)
    final = await trainer.stub.ReadTrainingJobLogs(tsvc.ReadTrainingJobLogsRequest(name=created.name, tail_lines=1))
    await logs.get_by_text(final.lines[0], exact=True).last.wait_for(timeout=10_000)  # read to the end
    assert await logs.locator("*").count() == await logs.locator("div").count()  # lines are text, never markup


async def test_a_viewer_is_told_the_logs_need_an_operator(page, tmp_path, registry, data_root, tiny_model, h):
    """With auth on, a viewer sees the job page; the log section says the trainer's PERMISSION_DENIED."""
    from neuroweaver_console.app import Console
    from neuroweaver_console.config import ConsoleConfig
    from neuroweaver_runtime.client import open_channel
    from neuroweaver_trainer.app import TrainerConfig, build

    service = build(
        TrainerConfig(
            port=0,
            metrics_port=-1,
            data_dir=str(tmp_path / "trainer"),
            dataset_roots=str(data_root),
            run_jobs=False,
            registry_target=registry.target,
            model_roots=str(tiny_model.rsplit("/", 1)[0]),
            shutdown_grace_seconds=1,
            auth_tokens="viewer-token=default:viewer,operator-token=default:operator",
            page_token_secret="s3cret",
        )  # fmt: skip
    )
    service.port = 0
    port = await service.start()
    channel = open_channel(f"127.0.0.1:{port}", token="operator-token")
    created = await tgrpc.TrainerServiceStub(channel).CreateTrainingJob(
        job(data_root, tiny_model, steps=2, eval_every=2, name="secret")
    )
    await channel.close()
    viewer_console = Console(
        ConsoleConfig(port=0, metrics_port=-1, registry_target=registry.target, trainer_target=f"127.0.0.1:{port}",
                      token="viewer-token")
    )  # fmt: skip
    await viewer_console.start()
    try:
        await page.goto(f"http://127.0.0.1:{viewer_console.port}/jobs/{created.name.rsplit('/', 1)[-1]}")
        status = page.locator("#logs-status", has_text="Your role cannot read this job's logs (it takes an operator)")
        await status.wait_for(timeout=30_000)
        assert await page.locator("#logs-text").inner_text() == ""
        assert await page.locator("#job-state").inner_text() == "queued"  # the rest of the page works
    finally:
        await page.goto("about:blank")  # the page's event stream ends before its console does
        await viewer_console.stop()
        await service.stop()
