"""Experiments use cases: lifecycle, assignment, ingestion, results and promotion."""

from __future__ import annotations

import builtins
from dataclasses import dataclass, replace
from datetime import datetime
from typing import cast

from neuroweaver_runtime import idempotency
from neuroweaver_runtime.errors import AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound
from neuroweaver_runtime.etag import check_etag
from neuroweaver_runtime.filtering import parse_filter, parse_order_by
from neuroweaver_runtime.names import PROJECT, validate_id
from neuroweaver_runtime.pagination import Page, PageTokens, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..domain.assignment import Assignment
from ..domain.experiment import (
    EXPERIMENT,
    MODEL,
    MODEL_VERSION,
    UPDATABLE_WHEN_CONCLUDED,
    Experiment,
    ExperimentState,
    Variant,
    apply_defaults,
    check_metric_kinds_kept,
    check_weights_only,
    require_running,
    srm_strata,
    transition,
    validate_experiment,
)
from ..domain.judging import JudgingStatus, RecordedAnswer, apply_judging_defaults, check_judge_kept
from ..domain.statistics import AnalysisMethod, Decision, DecisionConfig, ExperimentAnalysis, analyze_experiment
from .assignments import Assigner, Snapshot
from .endpoints import LiveEndpoints
from .ingest import EventBatch, Ingestor, IngestResult
from .judging import AnswerJudges, AnswerJudging, AnswerUnitOfWorkFactory, JudgingSettings, RecordAnswersResult
from .local_eval import LocalEvaluation
from .ports import ExperimentRepository, UnitOfWork, UnitOfWorkFactory, VariantEndpoints, VersionAliases

MAX_BATCH_ASSIGN = 10_000
_AUTO_CONCLUDE = {Decision.SHIP_VARIANT, Decision.STOP_FOR_HARM, Decision.NO_DETECTABLE_DIFFERENCE}


@dataclass
class Results:
    experiment: Experiment
    analysis: ExperimentAnalysis
    compute_time: datetime


@dataclass
class AutoConclusion:
    experiment: Experiment  # as concluded
    decision: Decision  # what the sequential test decided


class ExperimentsService:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        page_tokens: PageTokens,
        deployer: VariantEndpoints,
        registry: VersionAliases,
        *,
        snapshot_ttl: float = 1.0,
        judges: AnswerJudges | None = None,
        judging_settings: JudgingSettings | None = None,
    ) -> None:
        self.uow = uow
        self.tokens = page_tokens
        self.deployer = deployer
        self.registry = registry
        self.assigner = Assigner(uow, snapshot_ttl=snapshot_ttl)
        self.ingestor = Ingestor(uow, self.assigner)
        # Judge-scored live answers (RecordAnswers); None: this service has no judges (no registry client).
        self.judging = (
            AnswerJudging(cast(AnswerUnitOfWorkFactory, uow), self.ingestor, judges, judging_settings)
            if judges is not None
            else None
        )
        # Variants' endpoints as the deployer reports them now (they move when it restarts), not as stored at start.
        self.endpoints = LiveEndpoints(deployer, self._endpoint_moved)
        # Local evaluation by SDKs: config watches and their exposure/event batches.
        self.local = LocalEvaluation(uow, self.assigner, self.ingestor, self.endpoints)

    def _endpoint_moved(self, name: str) -> None:
        self.assigner.invalidate(name)
        self.local.endpoint_moved()  # config watches send the experiments whose endpoints moved

    async def close(self) -> None:
        if self.judging is not None:
            await self.judging.close()
        await self.endpoints.close()

    @staticmethod
    async def _get(repo: ExperimentRepository, name: str, *, lock: bool = False, field: str = "name") -> Experiment:
        EXPERIMENT.parse(name, field)
        exp = await repo.get(name, lock=lock)
        if exp is None:
            raise NotFound(f"experiment {name} does not exist", reason="EXPERIMENT_NOT_FOUND", metadata={"experiment": name})
        return exp

    @staticmethod
    async def _reread(repo: ExperimentRepository, name: str) -> Experiment:
        """The experiment as this transaction stored it (revision and update time as the store has them)."""
        exp = await repo.get(name)
        assert exp is not None  # written in this transaction, under its row lock
        return exp

    # -- CRUD ------------------------------------------------------------------------------------

    async def create(self, parent: str, experiment_id: str, exp: Experiment, request_id: str, fingerprint: str) -> Experiment:
        project = PROJECT.parse(parent, "parent")["project"]
        validate_id(experiment_id, "experiment_id", "experiment id")
        request_id = idempotency.validate_request_id(request_id)
        name = EXPERIMENT.format(project=project, experiment=experiment_id)
        apply_defaults(exp, experiment_id)
        for v in exp.variants:  # output-only fields are ignored on input
            v.endpoint = v.openai_base_url = ""
        validate_experiment(exp)
        await self._resolve_judge(exp)
        async with self.uow.transaction() as uow:
            earlier = await uow.find_request(request_id, "CreateExperiment", fingerprint)
            if earlier is None:
                exists = AlreadyExists(
                    f"experiment {name} already exists", reason="EXPERIMENT_ALREADY_EXISTS", metadata={"experiment": name}
                )
                if await uow.experiments.get(name) is not None:
                    raise exists
                now = utcnow()
                exp.name, exp.state, exp.winner, exp.conclusion = name, ExperimentState.DRAFT, "", ""
                exp.create_time = exp.update_time = now
                exp.start_time = exp.end_time = None
                exp.weights_history = [exp.weights]
                with uow.duplicate(exists):
                    await uow.experiments.add(exp, project)
                await uow.remember_request(request_id, "CreateExperiment", fingerprint, name)
            return await self._reread(uow.experiments, earlier or name)

    async def get(self, name: str) -> Experiment:
        async with self.uow.transaction() as uow:
            exp = await self._get(uow.experiments, name)
        await self.endpoints.apply(exp)
        return exp

    async def list(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        filters = parse_filter(filter_text, set(), enums={"state": ("STATE_", {s.value for s in ExperimentState})})
        order_field, desc = parse_order_by(order_by, {"name", "create_time", "update_time"}, "name")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, str if order_field == "name" else datetime, str)
        async with self.uow.transaction() as uow:
            items, after = await uow.experiments.page(project, filters, order_field, desc, cursor, limit)
        return Page(items, self.tokens.encode(after, query) if after is not None else "")

    async def update(self, patch: Experiment, paths: set[str], etag: str) -> Experiment:
        if "answer_judging" in paths:
            if patch.answer_judging is not None:
                apply_judging_defaults(patch.answer_judging)
            await self._resolve_judge(patch)
        async with self.uow.transaction() as uow:
            old = await self._get(uow.experiments, patch.name, lock=True, field="experiment.name")
            check_etag(old.name, old.revision, etag)
            if old.state is ExperimentState.CONCLUDED and not paths <= UPDATABLE_WHEN_CONCLUDED:
                raise FailedPrecondition(
                    f"experiment {old.name} is concluded: only {sorted(UPDATABLE_WHEN_CONCLUDED)} can change",
                    reason="EXPERIMENT_CONCLUDED",
                )
            new = replace(old, variants=[replace(v) for v in old.variants], weights_history=list(old.weights_history))
            for p in paths - {"variants"}:
                setattr(new, p, getattr(patch, p))
            if "primary_metric" in paths or "guardrail_metrics" in paths or "secondary_metrics" in paths:
                check_metric_kinds_kept(old, new.metrics)
            if "answer_judging" in paths:
                check_judge_kept(old.answer_judging, new.answer_judging, old.start_time is not None)
            if "variants" in paths:
                check_weights_only(old, patch.variants)
                if old.start_time is None:
                    new.variants = [replace(v, endpoint="", openai_base_url="") for v in patch.variants]
                else:
                    for v, patched in zip(new.variants, patch.variants, strict=True):
                        v.weight = patched.weight
            validate_experiment(new)
            if new.weights != old.weights:
                if old.start_time is None:
                    new.weights_history = [new.weights]
                else:
                    new.weights_history.append(new.weights)
            new.update_time = utcnow()
            await uow.experiments.save(new)
            result = await self._reread(uow.experiments, old.name)
        self.assigner.invalidate(old.name)
        self.local.changed()
        return result

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, name: str) -> Experiment:
        exp = await self.get(name)
        transition(exp.state, "start", name)
        # Resolve endpoints before taking the row lock: the deployer may be slow or down.
        resolved = {}
        for v in exp.variants:
            if v.deployment:
                resolved[v.id] = await self.deployer.endpoint(v.deployment)
        async with self.uow.transaction() as uow:
            exp = await self._get(uow.experiments, name, lock=True)
            exp.state = transition(exp.state, "start", name)
            for v in exp.variants:
                ep = resolved.get(v.id)
                if v.deployment and ep is None:
                    raise FailedPrecondition(f"variant {v.id} changed while starting; retry", reason="CONCURRENT_UPDATE")
                if ep is not None:
                    v.follow(ep.endpoint, ep.openai_base_url, ep.version_models)
            now = utcnow()
            exp.start_time = exp.start_time or now
            exp.end_time = None
            exp.update_time = now
            await uow.experiments.save(exp)
            result = await self._reread(uow.experiments, name)
        self.assigner.invalidate(name)
        self.local.changed()
        return result

    async def stop(self, name: str, reason: str) -> Experiment:
        if len(reason) > 1024:
            raise InvalidArgument("reason is at most 1024 characters", field="reason", reason="FIELD_TOO_LONG")
        async with self.uow.transaction() as uow:
            exp = await self._get(uow.experiments, name, lock=True)
            exp.state = transition(exp.state, "stop", name)
            exp.end_time = exp.update_time = utcnow()
            if reason:
                exp.conclusion = f"stopped: {reason}"
            await uow.experiments.save(exp)
            result = await self._reread(uow.experiments, name)
        self.assigner.invalidate(name)
        self.local.changed()
        return result

    async def conclude(self, name: str, winner: str, promote: bool, alias: str, expected_version: str, reason: str) -> Experiment:
        """Ends the experiment; with `promote` first moves the registry alias to the winner's model version
        (compare-and-set on `expected_version`). If the registry refuses, nothing changes here."""
        if len(reason) > 1000:
            raise InvalidArgument("reason is at most 1000 characters", field="reason", reason="FIELD_TOO_LONG")
        async with self.uow.transaction() as uow:
            exp = await self._get(uow.experiments, name, lock=True)
            result = await self._conclude_locked(uow.experiments, exp, winner, promote, alias, expected_version, reason)
        self.assigner.invalidate(name)
        self.local.changed()
        return result

    async def _conclude_locked(
        self,
        repo: ExperimentRepository,
        exp: Experiment,
        winner: str,
        promote: bool,
        alias: str,
        expected_version: str,
        reason: str,
    ) -> Experiment:
        """Concludes `exp`, read under its row lock in the caller's transaction; returns it as stored. Raises (and
        stores nothing) when it cannot: not RUNNING/STOPPED, an unknown winner, or the registry refused the promotion."""
        name = exp.name
        exp.state = transition(exp.state, "conclude", name)
        variant: Variant | None = None
        if winner:
            variant = exp.variant(winner)
            if variant is None:
                raise InvalidArgument(
                    f"winner {winner!r} is not a variant of {name} (variants: {exp.variant_ids})",
                    field="winner",
                    reason="UNKNOWN_VARIANT",
                )
        text = (
            f"experiment {name} concluded with winner {winner!r}" if winner else f"experiment {name} concluded without a winner"
        )
        if reason:
            text += f": {reason}"
        if promote:
            target_alias = alias or exp.promote_alias
            if variant is None:
                raise InvalidArgument("promote needs a winner", field="winner", reason="PROMOTE_WITHOUT_WINNER")
            if not target_alias:
                raise InvalidArgument(
                    "promote needs an alias: set the experiment's promote_alias or pass alias",
                    field="alias",
                    reason="MISSING_ALIAS",
                )
            validate_id(target_alias, "alias", "alias")
            parts = MODEL_VERSION.parse(variant.model_version, f"variants[{winner}].model_version")
            model = MODEL.format(project=parts["project"], model=parts["model"])
            # The remote call runs under this experiment's row lock: a concurrent Conclude waits, and the
            # experiment only becomes CONCLUDED if the alias moved.
            await self.registry.set_alias(model, target_alias, parts["version"], expected_version, text[:1024])
            text += f"; promoted {variant.model_version} to alias {target_alias!r}"
        exp.winner = winner
        exp.conclusion = text
        now = utcnow()
        exp.end_time = now
        exp.update_time = now
        await repo.save(exp)
        return await self._reread(repo, name)

    # -- assignment ------------------------------------------------------------------------------

    async def assign(
        self, experiment: str, units: builtins.list[str], *, batch: bool = False
    ) -> tuple[Experiment, builtins.list[Assignment]]:
        snap, assignments = await self.assign_snapshot(experiment, units, batch=batch)
        return snap.experiment, assignments

    async def assign_snapshot(
        self, experiment: str, units: builtins.list[str], *, batch: bool = False
    ) -> tuple[Snapshot, builtins.list[Assignment]]:
        if batch:
            if not units:
                raise InvalidArgument("unit_ids must not be empty", field="unit_ids", reason="INVALID_UNIT_ID")
            if len(units) > MAX_BATCH_ASSIGN:
                raise InvalidArgument(
                    f"at most {MAX_BATCH_ASSIGN} units per call, got {len(units)}", field="unit_ids", reason="BATCH_TOO_LARGE"
                )
        snap = await self.assigner.snapshot(experiment)
        require_running(snap.experiment, "units are assigned")
        if await self.endpoints.apply(snap.experiment):
            snap.replies.clear()  # rendered with the endpoints it had before
        return snap, await self.assigner.assign_many(snap, units)

    # -- metrics ---------------------------------------------------------------------------------

    async def record(self, experiment: str, events: EventBatch) -> IngestResult:
        return await self.ingestor.record(experiment, events)

    # -- judge-scored answers --------------------------------------------------------------------

    async def _resolve_judge(self, exp: Experiment) -> None:
        """The experiment's judge version must exist in the registry and be usable; `latest` becomes concrete."""
        if exp.answer_judging is None:
            return
        if self.judging is None:
            raise FailedPrecondition(
                "this experiments service has no judges configured; answer_judging cannot be set", reason="JUDGING_UNAVAILABLE"
            )
        await self.judging.resolve(exp)

    async def record_answers(self, experiment: str, answers: builtins.list[RecordedAnswer]) -> RecordAnswersResult:
        if self.judging is None:
            raise FailedPrecondition("this experiments service has no judges configured", reason="JUDGING_UNAVAILABLE")
        return await self.judging.record(experiment, answers)

    async def judging_status(self, exp: Experiment) -> JudgingStatus | None:
        return await self.judging.status(exp) if self.judging is not None else None

    # -- results ---------------------------------------------------------------------------------

    async def results(self, name: str) -> Results:
        """One look at the experiment (GetExperimentResults). It records the look's sequential state (the running
        minimum the always-valid statistics are made of) but never concludes: that is `auto_conclude`'s, in the
        background, or an explicit ConcludeExperiment's."""
        async with self.uow.transaction() as uow:
            exp = await self._get(uow.experiments, name, lock=True)  # one look at a time: sequential state is a running min
            analysis = await self._look(uow, exp)
        return Results(exp, analysis, utcnow())

    async def _look(self, uow: UnitOfWork, exp: Experiment) -> ExperimentAnalysis:
        """The analysis of `exp` (read under its row lock in `uow`) as of now. A fixed-horizon test's decision at its
        planned sample size is stored; a running experiment's sequential state is stored for the next look."""
        if exp.primary_metric is None:
            raise FailedPrecondition(f"experiment {exp.name} has no primary metric", reason="NO_PRIMARY_METRIC")
        stats = await uow.metrics.variant_stats(exp.key)
        covariates = await uow.metrics.covariate_stats(exp.key)
        exposures = await uow.assignments.exposures(exp.key)
        previous = await uow.metrics.sequential_states(exp.key)
        fixed = exp.analysis is AnalysisMethod.FIXED_HORIZON
        decided = await uow.metrics.horizon_decision(exp.key) if fixed else None
        ids = exp.variant_ids
        exposed = {v: sum(c.get(v, 0) for c in exposures.values()) for v in ids}
        strata = srm_strata(ids, exp.weights_history or [exp.weights], exp.coverage, exposures)
        analysis = analyze_experiment(
            ids,
            exp.weights,
            exposed,
            (exp.primary_metric, stats.get(exp.primary_metric.name, {})),
            [(g, stats.get(g.name, {})) for g in exp.guardrail_metrics],
            [(m, stats.get(m.name, {})) for m in exp.secondary_metrics],
            alpha=exp.significance_level,
            method=exp.analysis,
            config=DecisionConfig(min_sample_size=exp.min_sample_size),
            previous=previous,
            decided=decided,
            srm_strata=strata,
            covariates=covariates,
        )
        if analysis.outcome.at_horizon:  # a fixed-horizon test decides once, at its planned sample size
            await uow.metrics.save_horizon_decision(exp.key, analysis.outcome, utcnow())
        if exp.state is not ExperimentState.CONCLUDED:
            states = {}
            for mr in (analysis.primary, *analysis.guardrails, *analysis.secondary):
                for c in mr.comparisons:
                    states[(mr.metric.name, c.variant)] = c.state
            await uow.metrics.save_sequential_states(exp.key, states)
        return analysis

    # -- auto-conclusion (service/auto_conclude.py runs it in the background) ---------------------

    async def auto_concluding(self) -> builtins.list[Experiment]:
        """The RUNNING sequential experiments with `auto_conclude`: what the auto-conclude monitor looks at."""
        async with self.uow.transaction() as uow:
            return await uow.experiments.auto_concluding()

    async def auto_conclude(self, exp: Experiment) -> AutoConclusion | None:
        """One look by the auto-conclude monitor at `exp` (from `auto_concluding`): when the sequential test decides,
        the experiment concludes in the same transaction, under the row lock the look holds, so it concludes on
        exactly what was analysed (an UpdateExperiment waits) — with the winner promoted to `promote_alias` when the
        test ships one. None when it keeps running, is no longer auto-concluding, or another replica is looking at it
        now (it is skipped: one look per experiment at a time across replicas). When the conclusion fails (registry
        unreachable or refusing) the look is still recorded, the experiment keeps running and the error is raised:
        the next tick tries again."""
        failure: DomainError | None = None
        async with self.uow.transaction() as uow:
            if not await uow.experiments.claim_look(exp.key):
                return None
            exp = await self._get(uow.experiments, exp.name, lock=True)
            if not (exp.auto_conclude and exp.analysis is AnalysisMethod.SEQUENTIAL and exp.state is ExperimentState.RUNNING):
                return None  # changed since it was listed (concluded elsewhere, stopped, auto_conclude turned off)
            outcome = (await self._look(uow, exp)).outcome
            if outcome.decision not in _AUTO_CONCLUDE:
                return None
            ship = outcome.decision is Decision.SHIP_VARIANT
            winner = (outcome.recommended_variant or "") if ship else ""
            promote = ship and bool(exp.promote_alias)
            reason = f"auto-concluded by the sequential test: {outcome.reason}"[:1000]
            try:
                concluded = await self._conclude_locked(uow.experiments, exp, winner, promote, "", "", reason)
            except DomainError as exc:
                failure = exc  # raised once the look is committed
        if failure is not None:
            raise failure
        self.assigner.invalidate(exp.name)
        self.local.changed()
        return AutoConclusion(concluded, outcome.decision)
