"""ReadTrainingJobLogs against real trainers and real worker processes: the tail of an attempt's log, following it
from `next_offset` while the worker writes, attempt selection after a pause and resume, a queued job, a huge log read
from its end only, and (PostgreSQL, two replicas) a local worker's log asked of the replica that did not run it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_kube.testing.pods import PodRunner, bwrap_path
from neuroweaver_runtime import migrations
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.testing import create_postgres_database
from neuroweaver_sdk.cli import run
from neuroweaver_sdk.watch import follow_training_job_logs
from neuroweaver_trainer.adapters.logs import text
from neuroweaver_trainer.app import MIGRATIONS

pytestmark = pytest.mark.slow  # real workers train a tiny model


def logs_request(h, name: str, **kw):
    return h.tsvc.ReadTrainingJobLogsRequest(name=name, **kw)


def as_lines(log: bytes) -> list[str]:
    """A log file's lines as the API gives them (progress bars' carriage-return rewrites as a terminal shows them)."""
    return [text(line) for line in log.removesuffix(b"\n").split(b"\n")]


async def collect(answers_of, into: list) -> None:
    async for answer in answers_of:
        into.append(answer)


def create(h, job_id: str, tiny_model, data_root, **kw):
    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, **kw)
    return h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id=job_id, training_job=job)


async def test_refusals_before_any_worker_ran(trainers, h, tiny_model, data_root, rpc_err):
    trainer = await trainers(run_jobs=False)
    stub = trainer.stub
    queued = await stub.CreateTrainingJob(create(h, "logs-queued", tiny_model, data_root))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ReadTrainingJobLogs(logs_request(h, queued.name))
    assert rpc_err(exc)[:2] == (grpc.StatusCode.NOT_FOUND, "LOGS_NOT_FOUND")
    assert "no worker has started" in exc.value.details()
    for bad, field in ((dict(tail_lines=5001), "tail_lines"), (dict(offset=-1), "offset"), (dict(attempt=-1), "attempt")):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ReadTrainingJobLogs(logs_request(h, queued.name, **bad))
        code, _, violations = rpc_err(exc)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations] == [field]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ReadTrainingJobLogs(logs_request(h, "projects/default/trainingJobs/nope"))
    assert rpc_err(exc)[:2] == (grpc.StatusCode.NOT_FOUND, "TRAINING_JOB_NOT_FOUND")

    # `nw train logs --follow` (a real process) waits for a worker, says why, and Ctrl-C ends it cleanly.
    nw = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "nw"), "--trainer", f"127.0.0.1:{trainer.port}", "train", "logs", "logs-queued",
        "--follow", "--interval", "0.2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert nw.stderr is not None
    said = await asyncio.wait_for(nw.stderr.readline(), 30)
    assert said.startswith(b"waiting: training job projects/default/trainingJobs/logs-queued is queued"), said
    nw.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(nw.communicate(), 30)
    assert nw.returncode == 130 and out == b"" and b"Traceback" not in err, err


async def test_tail_follow_attempts_and_a_huge_log(trainers, h, tiny_model, data_root, rpc_err, capsys):
    trainer = await trainers()
    stub = trainer.stub
    job = await stub.CreateTrainingJob(
        # Steps enough that the pause (read by the worker once a second) lands long before the end on a busy machine.
        create(h, "logs-run", tiny_model, data_root, max_steps=300, checkpoint_every=1000, eval_every=1000)
    )
    logs_dir = Path(trainer.config["data_dir"]) / "jobs" / "logs-run"

    # Attempt 1 runs until paused; its log is followed from offset 0 while the worker writes it.
    followed, offset, reads, pause_sent, paused = [], 0, 0, False, False
    while True:
        exited = paused and not trainer.service.scheduler.running  # the worker is gone: this read is the last
        try:
            resp = await stub.ReadTrainingJobLogs(logs_request(h, job.name, offset=offset))
        except grpc.aio.AioRpcError as exc:
            assert error_info(exc).reason == "LOGS_NOT_FOUND" and not reads  # claimed, its worker not spawned yet
            await asyncio.sleep(0.1)
            continue
        reads += 1
        followed += resp.lines
        offset = resp.next_offset
        assert (resp.attempt, resp.executor) == (1, h.tpb.EXECUTOR_LOCAL)
        if exited and not resp.truncated:
            break
        paused = resp.state == h.tpb.TrainingJob.STATE_PAUSED
        S = h.tpb.TrainingJob
        assert resp.state not in (S.STATE_SUCCEEDED, S.STATE_FAILED, S.STATE_CANCELLED), "the job ended before its pause"
        if not pause_sent and (await stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))).current_step >= 2:
            await stub.PauseTrainingJob(h.tsvc.PauseTrainingJobRequest(name=job.name))
            pause_sent = True
        await asyncio.sleep(0.2)
    first_log = (logs_dir / "worker-1.log").read_bytes()
    assert followed == as_lines(first_log) and offset == len(first_log) and reads > 2
    assert any(f"attempt 1 of {job.name} starts" in line for line in followed)

    # Attempt 2 (resumed) to the end, followed by the SDK's follower (what `nw train logs --follow` prints): it starts
    # on attempt 1, the latest while paused, and moves to attempt 2 when the job starts it.
    answers: list = []
    follower = asyncio.create_task(
        collect(follow_training_job_logs(SimpleNamespace(trainer=stub), job.name, interval=0.2), answers)
    )
    await h.wait_for(lambda: answers, 30, what="the follower's first read")
    await stub.ResumeTrainingJob(h.tsvc.ResumeTrainingJobRequest(name=job.name))
    done = await h.wait_state(stub, job.name, timeout=180)
    assert done.state == h.tpb.TrainingJob.STATE_SUCCEEDED and done.attempts == 2, done.error
    await asyncio.wait_for(follower, 30)  # it ends by itself once the job is over and read to the end
    second_log = as_lines((logs_dir / "worker-2.log").read_bytes())
    assert answers[0].attempt == 1 and list(answers[0].lines) == followed[-200:]
    assert [line for a in answers if a.attempt == 2 for line in a.lines] == second_log
    assert answers[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED

    # `nw train logs`: the tail as it is (a note on the attempt on stderr), -q an earlier attempt's lines only,
    # --follow --json one answer per line, ending with the job.
    base = ["--trainer", f"127.0.0.1:{trainer.port}", "train", "logs", "logs-run"]
    capsys.readouterr()
    assert await run([*base, "--tail", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(f"{line}\n" for line in second_log[-3:])
    assert "attempt 2 of 2 (local, job succeeded), earlier lines not shown" in out.err
    assert await run([*base, "--attempt", "1", "--tail", "2", "-q"]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(f"{line}\n" for line in followed[-2:]) and out.err == ""
    assert await run([*base, "--follow", "--json", "--tail", "1", "--interval", "0.1"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown[0]["lines"] == second_log[-1:] and shown[0]["attempt"] == 2 and shown[-1]["state"] == "STATE_SUCCEEDED"
    latest = await stub.ReadTrainingJobLogs(logs_request(h, job.name))
    assert (latest.attempt, latest.attempts, latest.state) == (2, 2, h.tpb.TrainingJob.STATE_SUCCEEDED)
    assert list(latest.lines) == second_log[-200:] and any(f"attempt 2 of {job.name} starts" in x for x in latest.lines)
    tail = await stub.ReadTrainingJobLogs(logs_request(h, job.name, attempt=1, tail_lines=3))
    assert list(tail.lines) == followed[-3:] and tail.truncated and tail.attempt == 1
    head = await stub.ReadTrainingJobLogs(logs_request(h, job.name, attempt=1, offset=0, tail_lines=2))
    assert list(head.lines) == followed[:2] and head.truncated
    rest = await stub.ReadTrainingJobLogs(logs_request(h, job.name, attempt=1, offset=head.next_offset))
    assert list(rest.lines) == followed[2:] and not rest.truncated
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ReadTrainingJobLogs(logs_request(h, job.name, attempt=3))
    assert rpc_err(exc)[0] == grpc.StatusCode.INVALID_ARGUMENT and rpc_err(exc)[2][0][0] == "attempt"

    # A 50 MB log: its last lines come back at once, and the read holds a bounded amount of memory.
    with open(logs_dir / "worker-2.log", "ab") as f:
        f.write(b"".join(b"%08d " % i + b"x" * 91 + b"\n" for i in range(500_000)))
    tracemalloc.start()
    started = time.monotonic()
    big = await stub.ReadTrainingJobLogs(logs_request(h, job.name, tail_lines=10))
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [line[:8] for line in big.lines] == [f"{i:08d}" for i in range(499_990, 500_000)] and big.truncated
    assert big.next_offset == (logs_dir / "worker-2.log").stat().st_size
    assert elapsed < 2.0 and peak < 8 << 20, (elapsed, peak)


@pytest.fixture
async def pg_url():
    url, drop = await create_postgres_database("nwtrainer")
    await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)
    yield url
    await drop()


@pytest.mark.postgres
async def test_a_local_log_asked_of_another_replica_names_the_holder(
    pg_url, trainers, h, tiny_model, data_root, tmp_path, rpc_err
):
    runner = await trainers(database_url=pg_url, data_dir=str(tmp_path / "a"), migrate=False)
    other = await trainers(database_url=pg_url, data_dir=str(tmp_path / "b"), run_jobs=False, migrate=False)
    job = await other.stub.CreateTrainingJob(
        create(h, "logs-elsewhere", tiny_model, data_root, max_steps=500, checkpoint_every=1000, eval_every=1000)
    )

    async def runner_reads_its_log():
        try:
            return await runner.stub.ReadTrainingJobLogs(logs_request(h, job.name))
        except grpc.aio.AioRpcError as exc:
            assert error_info(exc).reason == "LOGS_NOT_FOUND"  # queued, or claimed and its worker not spawned yet
            return None

    await h.wait_for(runner_reads_its_log, 60, 0.1, "the running replica to read its worker's log")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await other.stub.ReadTrainingJobLogs(logs_request(h, job.name))
    owner = runner.service.scheduler.s.owner
    assert rpc_err(exc)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "LOGS_ELSEWHERE") and owner in exc.value.details()
    metadata = dict(error_info(exc.value).metadata)
    assert metadata == {"training_job": job.name, "state": "RUNNING", "attempt": "1", "replica": owner}
    await other.stub.CancelTrainingJob(h.tsvc.CancelTrainingJobRequest(name=job.name))
    await h.wait_state(other.stub, job.name, timeout=60)


async def test_a_kubernetes_workers_log_is_its_pods(trainers, h, tiny_model, data_root, rpc_err):
    """The KUBERNETES executor on the API stand-in with its pod runner: the Job's pod runs the trainer image's worker,
    which fails at once on the database path the Secret names (on the read-only root); that output comes back through the pods/log API."""
    if bwrap_path() is None:
        pytest.skip("bubblewrap (bwrap) is not installed: the stand-in runs pods in it (apt-get install bubblewrap)")
    with KubeApiStandIn(pods=PodRunner()) as standin:
        standin.put({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "neuroweaver-trainer", "namespace": "training"},
            "stringData": {"database-url": "sqlite+aiosqlite:////nonexistent/trainer.db"},
        })  # fmt: skip
        trainer = await trainers(kube_api=standin.url, kube_namespace="training")
        job = h.job_pb(
            tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, executor=h.tpb.EXECUTOR_KUBERNETES
        )
        job = await trainer.stub.CreateTrainingJob(
            h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="logs-kube", training_job=job)
        )

        async def worker_said_why():
            try:
                resp = await trainer.stub.ReadTrainingJobLogs(logs_request(h, job.name))
            except grpc.aio.AioRpcError as exc:  # no pod yet, or its container is being created
                assert error_info(exc).reason == "LOGS_NOT_FOUND", exc
                return None
            return resp if any("Read-only file system" in line for line in resp.lines) else None

        resp = await h.wait_for(worker_said_why, 90, 0.2, "the worker pod's output")
        assert (resp.attempt, resp.executor) == (1, h.tpb.EXECUTOR_KUBERNETES) and resp.next_offset > 0
        # The Job retries its failed pod (backoffLimit) and the trainer reads the newest one, so the pod read may be
        # gone or replaced by now: what comes back is checked as the worker's output, not against one pod's log.
        lines = list(resp.lines)
        assert any(line.startswith("Traceback") for line in lines), lines
        assert lines[-1] == "OSError: [Errno 30] Read-only file system: '/nonexistent'", lines

        async def last_line():  # a retry pod just created has no output yet, or only part of it
            try:
                tail = await trainer.stub.ReadTrainingJobLogs(logs_request(h, job.name, tail_lines=1))
            except grpc.aio.AioRpcError as exc:
                assert error_info(exc).reason == "LOGS_NOT_FOUND", exc
                return None
            return tail if tail.lines and tail.lines[-1].startswith("OSError") else None

        last = await h.wait_for(last_line, 60, 0.2, "a last line")
        assert list(last.lines) == lines[-1:] and last.truncated and last.next_offset >= resp.next_offset
        after = await trainer.stub.ReadTrainingJobLogs(logs_request(h, job.name, offset=last.next_offset))
        assert after.next_offset >= last.next_offset  # from the offset on: the position never goes back
        await trainer.stub.CancelTrainingJob(h.tsvc.CancelTrainingJobRequest(name=job.name))
        await h.wait_state(trainer.stub, job.name, timeout=60)
