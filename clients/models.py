"""Request and response bodies of the objective server's API, shared by the server and the client."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

Split = Literal["train", "validation"]


class LossPostBody(BaseModel):
    """POST /losses: one rank's per-configuration mean losses and token counts for one step."""

    # Numbers must be numbers: lax parsing read `true` as a loss of 1.0 and "7" as step 7.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    run: str
    step: StrictInt = Field(ge=0)
    rank: StrictInt = Field(0, ge=0)
    world_size: StrictInt = Field(1, ge=1)
    split: Split = "train"
    losses: dict[str, StrictFloat]
    tokens: dict[str, StrictInt]


class LossPostResponse(BaseModel):
    status: Literal["accepted", "duplicate"]
    ranks_posted: int
    world_size: int
    completed: bool = False  # this post completed (split, step) across all ranks
    policy_updated: bool = False  # and the policy took it into account
    policy_note: str | None = None  # why the policy did not, when it consumed it without effect
    mixture_version: int | None = None  # the latest mixture version after this post


class MixtureResponse(BaseModel):
    run: str
    policy: str
    version: int
    effective_step: int
    max_served: int
    probabilities: dict[str, float]
    families: dict[str, float]
    exploration: float | None = None
    last_losses: dict[str, float] = Field(default_factory=dict)
    rewards: dict[str, float] = Field(default_factory=dict)
    predicted_reward: float | None = None
    history_length: int = 0
    meta: dict[str, Any] = Field(default_factory=dict)


class MixtureRecordOut(BaseModel):
    version: int
    effective_step: int
    created_at_step: int | None = None
    probabilities: dict[str, float]
    meta: dict[str, Any] = Field(default_factory=dict)


class EvaluationOut(BaseModel):
    """One evaluation: every rank's validation losses at `step`, token-weighted per configuration."""

    step: int
    losses: dict[str, float]
    tokens: dict[str, int]


class MixtureHistoryResponse(BaseModel):
    run: str
    timeline: list[tuple[int, int]]  # (effective_step, version)
    mixtures: list[MixtureRecordOut]
    max_served: int = -1
    families: dict[str, str] = Field(default_factory=dict)  # configuration name -> family
    evaluations: list[EvaluationOut] = Field(default_factory=list)  # in the order the policy took them


class ObjectiveInfo(BaseModel):
    name: str
    family: str
    params: dict[str, Any]


class RunSummary(BaseModel):
    name: str
    policy: str
    objectives: int
    seq_len: int
    batch_size: int
    mixture_version: int
    max_served: int
    unservable: str | None = None  # why this server cannot serve the run (e.g. another corpus)


class RunInfo(BaseModel):
    name: str
    config: dict[str, Any]
    objectives: list[ObjectiveInfo]
    vocab_size: int
    special_tokens: dict[str, int]
    eval_steps: list[int]
    mixture_version: int
    max_served: int


class RunList(BaseModel):
    runs: list[RunSummary]


class ErrorBody(BaseModel):
    detail: Any
