"""Creating runs and describing them: run lists, run info, mixtures and their history, objectives."""

from __future__ import annotations

from typing import Any

from clients.models import (
    EvaluationOut,
    MixtureHistoryResponse,
    MixtureRecordOut,
    MixtureResponse,
    ObjectiveInfo,
    RunInfo,
    RunSummary,
)
from objective_server.corpus.store import TokenStore
from objective_server.objectives import Objective
from objective_server.objectives.presets import list_presets, preset
from objective_server.runs import RunConfig
from objective_server.service.errors import InvalidRequest, RunConflict
from objective_server.service.registry import RunContext, RunRegistry
from objective_server.store import RunStore


def objective_info(objective: Objective) -> ObjectiveInfo:
    return ObjectiveInfo(name=objective.name, family=objective.family, params=objective.params())


class RunService:
    def __init__(self, store: RunStore, registry: RunRegistry, corpus: TokenStore) -> None:
        self.store = store
        self.registry = registry
        self.corpus = corpus

    async def create(self, config: RunConfig) -> tuple[RunInfo, bool]:
        context, created = await self.registry.register(config)
        return await self.info(context.name), created

    async def summaries(self) -> list[RunSummary]:
        """Every run in the store, those this server cannot serve included (another corpus, a policy it
        does not know): listed from their stored config, with the reason."""
        out = []
        for name in await self.store.list_runs():
            try:
                context = await self.registry.get(name)
            except (RunConflict, ValueError) as error:  # ValueError: InvalidRequest, a config it rejects
                config, known, unservable = await self.store.get_config(name), None, str(error)
            else:
                config, known, unservable = context.config.stored(), context.timeline, None
            timeline = await self.store.timeline(name, known=known)
            if unservable is None:
                context.remember(timeline)
            out.append(RunSummary(
                name=name, policy=config["policy"]["name"], objectives=len(config["arms"]),
                seq_len=config["seq_len"], batch_size=config["batch_size"], mixture_version=timeline.latest_version,
                max_served=timeline.max_served, unservable=unservable,
            ))
        return out

    async def info(self, run: str) -> RunInfo:
        context = await self.registry.get(run)
        timeline = await self.store.timeline(run, known=context.timeline)
        context.remember(timeline)
        c = context.config
        return RunInfo(
            name=c.name, config=c.stored(), objectives=[objective_info(o) for o in c.objectives],
            vocab_size=self.corpus.vocab_size, special_tokens=self.corpus.special.ids,
            eval_steps=c.evaluation_steps, mixture_version=timeline.latest_version, max_served=timeline.max_served,
        )

    async def mixture(self, run: str) -> MixtureResponse:
        """The latest mixture, by configuration and by family, with what the policy reports.

        From the policy's `describe(state)` these keys are shown in their own fields: exploration,
        last_losses, rewards, predicted_reward, history_length (else evaluations); the whole
        description is in meta["policy_state"].
        """
        context = await self.registry.get(run)
        record = await self.store.mixture(run)
        timeline = await self.store.timeline(run, known=context.timeline)
        context.remember(timeline)
        policy_version, state = await self.store.policy_state(run)
        described: dict[str, Any] = context.policy.describe(state)
        families: dict[str, float] = {}
        for family, p in zip(context.families, record.probabilities):
            families[family] = families.get(family, 0.0) + p
        return MixtureResponse(
            run=run, policy=context.config.policy.name, version=record.version,
            effective_step=record.effective_step, max_served=timeline.max_served,
            probabilities=dict(zip(context.names, record.probabilities)), families=families,
            exploration=described.get("exploration"), last_losses=described.get("last_losses") or {},
            rewards=described.get("rewards") or {}, predicted_reward=described.get("predicted_reward"),
            history_length=int(described.get("history_length", described.get("evaluations", 0))),
            meta={
                **record.meta, "created_at_step": record.created_at_step, "policy_version": policy_version,
                "policy_state": described, "train_totals": await self.store.train_totals(run),
            },
        )

    async def history(self, run: str) -> MixtureHistoryResponse:
        context = await self.registry.get(run)
        records = await self.store.mixture_history(run)
        timeline = await self.store.timeline(run, known=context.timeline)
        context.remember(timeline)
        evaluations = await self.store.evaluations(run)
        return MixtureHistoryResponse(
            run=run,
            timeline=list(timeline.entries),
            mixtures=[
                MixtureRecordOut(
                    version=r.version, effective_step=r.effective_step, created_at_step=r.created_at_step,
                    probabilities=dict(zip(context.names, r.probabilities)), meta=r.meta,
                )
                for r in records
            ],
            max_served=timeline.max_served,
            families=dict(zip(context.names, context.families)),
            evaluations=[EvaluationOut(step=a.step, losses=a.losses, tokens=a.tokens) for a in evaluations],
        )

    async def objectives(self, run: str | None, seq_len: int) -> list[ObjectiveInfo]:
        """The run's configurations, or every configuration of the shipped presets at `seq_len`."""
        if run is not None:
            context: RunContext = await self.registry.get(run)
            return [objective_info(o) for o in context.config.objectives]
        try:
            seen: dict[str, Objective] = {}
            for name in list_presets():
                for objective, _ in preset(name, seq_len):
                    seen.setdefault(objective.name, objective)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        return [objective_info(o) for o in seen.values()]
