"""Settings from BIRDIE_* variables, and the checks that refuse unsafe combinations."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from objective_server.settings import Settings, redacted_url


def test_environment_variables_fill_the_settings(monkeypatch):
    monkeypatch.setenv("BIRDIE_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("BIRDIE_WORKERS", "4")
    monkeypatch.setenv("BIRDIE_RUN_FILES", "a.yaml, b.toml")
    monkeypatch.setenv("BIRDIE_PRESETS", "birdie,ntp")
    monkeypatch.setenv("BIRDIE_API_TOKEN", "secret")
    monkeypatch.setenv("BIRDIE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("BIRDIE_CORPUS", "")  # compose's ${BIRDIE_CORPUS:-}: not set
    settings = Settings()
    assert settings.redis_url == "redis://redis:6379/0" and settings.workers == 4
    assert settings.run_files == [Path("a.yaml"), Path("b.toml")] and settings.presets == ["birdie", "ntp"]
    assert settings.api_token.get_secret_value() == "secret" and "secret" not in repr(settings)
    assert settings.log_level == "debug" and settings.corpus is None
    # Arguments win over the environment.
    assert Settings(workers=2).workers == 2


def test_a_bare_server_registers_every_shipped_preset_run_and_an_empty_list_none(monkeypatch):
    from objective_server.runs import preset_run_files
    from objective_server.service.services import configured_runs

    monkeypatch.delenv("BIRDIE_PRESETS", raising=False)
    assert [c.name for c in configured_runs(Settings())] == ["birdie", "ul2", "decoder-ul2", "ntp"]
    assert set(Settings().presets) == set(preset_run_files())
    monkeypatch.setenv("BIRDIE_PRESETS", "")
    assert configured_runs(Settings()) == []


def test_environment_round_trips_for_worker_processes(monkeypatch):
    settings = Settings(redis_url="redis://h:1/0", workers=3, run_files=["x.yaml"], api_token="t",
                        corpus="/data/c", prefetch_depth=0)
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_several_workers_need_a_shared_store():
    with pytest.raises(ValidationError, match="need a shared state store"):
        Settings(workers=2)
    with pytest.raises(ValidationError, match="need a shared state store"):
        Settings(workers=2, redis_url="memory://")
    assert Settings(workers=2, redis_url="redis://localhost:6379/0").workers == 2


def test_bad_values_are_refused():
    for bad in ({"port": 70000}, {"generation_executor": "gpu"}, {"cache_size": 0}, {"log_level": "loud"},
                {"max_request_tokens": 10}):
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_logged_urls_hide_passwords():
    assert redacted_url("redis://:pw@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted_url("redis://user:pw@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert redacted_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert "pw" not in Settings(redis_url="redis://:pw@r:1/0").store_description


def test_auto_generation_uses_processes_for_one_worker_and_threads_for_several():
    assert Settings().generation_kind == "process"
    assert Settings(workers=3, redis_url="redis://r:1/0").generation_kind == "thread"
    assert Settings(workers=3, redis_url="redis://r:1/0", generation_executor="process").generation_kind == "process"
    assert Settings(generation_executor="thread").generation_kind == "thread"
