"""The objective server's settings: one pydantic-settings class, read from `BIRDIE_*` variables.

    BIRDIE_REDIS_URL=redis://redis:6379/0 BIRDIE_RUN_FILES=runs.yaml,ablation.toml birdie-server serve

Every field can also be set by the `serve` command's options (which export them as variables, so
that uvicorn's worker processes build the same app from the environment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from objective_server.store import REDIS_SCHEMES

ENV_PREFIX = "BIRDIE_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # State store: None (or memory://) keeps the run state in this process; a Redis URL shares it
    # between workers and replicas.
    redis_url: str | None = None
    redis_namespace: str = "birdie"
    redis_timeout_s: float = Field(1.0, gt=0)
    # When set, every route except /healthz and /readyz needs `Authorization: Bearer <token>`.
    api_token: SecretStr | None = None
    # A prepared token store; None: the embedded default corpus (prepared on first use).
    corpus: Path | None = None
    # Run config files (YAML/TOML) registered at start; comma-separated in the environment.
    run_files: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Preset run files (objective_server/presets/<name>.yaml) registered at start, by name. By
    # default all shipped presets, so a bare `serve` answers /batch?run=birdie; BIRDIE_PRESETS=""
    # (empty) registers none.
    presets: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["birdie", "ul2", "decoder-ul2", "ntp"])
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    # Limits: tokens of one batch (batch_size * seq_len) and bytes of one request body.
    max_request_tokens: int = Field(1 << 20, ge=64)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Largest step, index and world size an address may name (keeps row arithmetic in int64).
    max_step: int = Field((1 << 31) - 1, ge=1)
    max_world_size: int = Field(1 << 16, ge=1)
    # Batch generation: steps generated ahead for each rank after it is served, recent batches kept,
    # and the pool that generates them. "process": worker processes, so one server process uses
    # several cores (each batch then crosses a pipe, ~2 ms CPU for 400 KB); "thread": no copy, but
    # one core per server process (generation holds the GIL). "auto": processes for a single
    # worker, threads when there are several uvicorn workers (they already use the cores).
    prefetch_depth: int = Field(2, ge=0, le=64)
    cache_size: int = Field(128, ge=1)
    generation_workers: int = Field(2, ge=1, le=256)
    generation_executor: Literal["auto", "process", "thread"] = "auto"
    # Pending loss aggregates are drained (policy update) at least this often per run.
    drain_interval_s: float = Field(5.0, gt=0)
    # A policy update may hold the run's lock this long before another replica may take it over.
    policy_lock_ttl_s: float = Field(120.0, gt=0)
    policy_lock_wait_s: float = Field(30.0, gt=0)
    retry_after_s: int = Field(1, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False  # one line per request: off by default at batch rates

    @field_validator("run_files", "presets", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        if isinstance(value, str) and value.strip() in ("", "memory://"):
            return None
        if isinstance(value, str) and not value.startswith(REDIS_SCHEMES):
            # (the value is not echoed: it may hold a password)
            raise ValueError(f"must be empty, memory:// or start with {', '.join(REDIS_SCHEMES)}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_token", "corpus", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker compose passes `${VAR:-}` as an empty string: the same as not set.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _workers_need_a_shared_store(self) -> Settings:
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                f"{self.workers} workers need a shared state store: set BIRDIE_REDIS_URL (or "
                "--redis-url); with the in-process store each worker would keep its own run state"
            )
        return self

    @property
    def generation_kind(self) -> Literal["process", "thread"]:
        if self.generation_executor != "auto":
            return self.generation_executor
        return "process" if self.workers == 1 else "thread"

    @property
    def store_description(self) -> str:
        if self.redis_url is None:
            return "in-process store (state lives in this process only)"
        return f"redis {redacted_url(self.redis_url)} (namespace {self.redis_namespace!r})"

    def environment(self) -> dict[str, str]:
        """These settings as BIRDIE_* variables (what worker processes read back)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ",".join(str(v) for v in value)
            env[ENV_PREFIX + name.upper()] = str(value)
        return env


def redacted_url(url: str) -> str:
    """`url` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))
