"""Judge use cases: judges (AI-judge configurations) and their immutable, numbered versions."""

from __future__ import annotations

from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.errors import AlreadyExists, NotFound, Violations
from neuroweaver_runtime.names import PROJECT, validate_id
from neuroweaver_runtime.pagination import Page, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..domain.judges import validate_judge_config
from ..domain.model import JUDGE, JUDGE_VERSION, Judge, JudgeVersion
from .base import UseCases, event
from .ports import UnitOfWork


async def _judge(uow: UnitOfWork, name: str, *, lock: bool = False) -> Judge:
    judge = await uow.judges.get(name, lock=lock)
    if judge is None:
        raise NotFound(f"judge {name} does not exist", reason="JUDGE_NOT_FOUND")
    return judge


class JudgeUseCases(UseCases):
    async def create(
        self, parent: str, judge_id: str, judge: Judge, config: dict, notes: str, request_id: str, fingerprint: str
    ) -> Judge:
        project = PROJECT.parse(parent, "parent")["project"]
        validate_id(judge_id, "judge_id", "judge id")
        request_id = idempotency.validate_request_id(request_id)
        v = Violations()
        validate_judge_config(config, v, "judge_version")
        if len(judge.display_name) > 200:
            v.add("judge.display_name", "at most 200 characters")
        if len(judge.description) > 4000:
            v.add("judge.description", "at most 4000 characters")
        v.raise_if_any()
        name = JUDGE.format(project=project, judge=judge_id)
        async with self.uow.transaction() as uow:
            earlier = await uow.find_request(request_id, "CreateJudge", fingerprint)
            if earlier is None:
                exists = AlreadyExists(f"judge {name} already exists", reason="JUDGE_ALREADY_EXISTS")
                if await uow.judges.get(name) is not None:
                    raise exists
                now, actor = utcnow(), current_actor()
                judge.name, judge.creator, judge.create_time = name, actor, now
                with uow.duplicate(exists):
                    await uow.judges.add(judge)
                await uow.judges.add_version(judge, JudgeVersion(f"{name}/versions/1", 1, {**config, "notes": notes}, actor, now))
                await uow.remember_request(request_id, "CreateJudge", fingerprint, name)
                await event(uow, project, "JUDGE_CREATED", name)
                await event(uow, project, "JUDGE_VERSION_CREATED", f"{name}/versions/1")
            return await _judge(uow, name)

    async def get(self, name: str) -> Judge:
        JUDGE.parse(name)
        async with self.uow.read() as uow:
            return await _judge(uow, name)

    async def list(self, parent: str, size: int, token: str) -> Page[Judge]:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        cursor = self.tokens.decode(token, [parent], str)
        async with self.uow.read() as uow:
            judges = await uow.judges.page(project, cursor[0] if cursor else None, limit + 1)
        next_token = self.tokens.encode([judges[limit - 1].name], [parent]) if len(judges) > limit else ""
        return Page(judges[:limit], next_token)

    async def create_version(self, parent: str, config: dict, notes: str, request_id: str, fingerprint: str) -> JudgeVersion:
        JUDGE.parse(parent, "parent")
        request_id = idempotency.validate_request_id(request_id)
        v = Violations()
        validate_judge_config(config, v, "judge_version")
        v.raise_if_any()
        async with self.uow.transaction() as uow:
            judge = await _judge(uow, parent, lock=True)
            earlier = await uow.find_request(request_id, "CreateJudgeVersion", fingerprint)
            if earlier is not None:
                number = int(earlier.rsplit("/", 1)[1])
            else:
                number = judge.latest_version + 1
                name = f"{parent}/versions/{number}"
                await uow.judges.add_version(
                    judge, JudgeVersion(name, number, {**config, "notes": notes}, current_actor(), utcnow())
                )
                await uow.remember_request(request_id, "CreateJudgeVersion", fingerprint, name)
                await event(uow, judge.project, "JUDGE_VERSION_CREATED", name)
            version = await uow.judges.get_version(judge, number)
        if version is None:  # cannot happen: judge versions are never deleted
            raise NotFound(f"judge version {parent}/versions/{number} does not exist", reason="JUDGE_VERSION_NOT_FOUND")
        return version

    async def get_version(self, name: str) -> JudgeVersion:
        parts = JUDGE_VERSION.parse(name)
        judge_name = JUDGE.format(project=parts["project"], judge=parts["judge"])
        async with self.uow.read() as uow:
            judge = await _judge(uow, judge_name)
            number = judge.latest_version if parts["version"] == "latest" else int(parts["version"])
            version = await uow.judges.get_version(judge, number)
        if version is None:
            raise NotFound(f"judge version {name} does not exist", reason="JUDGE_VERSION_NOT_FOUND")
        return version

    async def list_versions(self, parent: str, size: int, token: str) -> Page[JudgeVersion]:
        JUDGE.parse(parent, "parent")
        limit = page_size(size)
        cursor = self.tokens.decode(token, [parent], int)
        async with self.uow.read() as uow:
            judge = await _judge(uow, parent)
            versions = await uow.judges.list_versions(judge, cursor[0] if cursor else None, limit + 1)
        next_token = self.tokens.encode([versions[limit - 1].version], [parent]) if len(versions) > limit else ""
        return Page(versions[:limit], next_token)
