"""`birdie-server serve` refuses what cannot work, with a clear message, before starting anything."""

from __future__ import annotations

from click.testing import CliRunner

from objective_server.cli import main
from server.conftest import run_config, write_runs


def test_several_workers_with_the_in_process_store_are_refused():
    result = CliRunner().invoke(main, ["serve", "--workers", "2"], env={"BIRDIE_REDIS_URL": ""})
    assert result.exit_code == 2
    assert "need a shared state store" in result.output and "BIRDIE_REDIS_URL" in result.output


def test_a_bad_run_file_or_preset_is_reported(tmp_path, corpus_path):
    broken = tmp_path / "runs.yaml"
    broken.write_text("runs: [{name: x, arms: [{objective: infilling.nope, probability: 1}]}]")
    result = CliRunner().invoke(main, ["serve", "--corpus", str(corpus_path), "--runs", str(broken)])
    assert result.exit_code == 1 and "infilling.nope" in result.output

    twice = write_runs(tmp_path / "twice.yaml", run_config("same"), run_config("same"))
    result = CliRunner().invoke(main, ["serve", "--corpus", str(corpus_path), "--runs", str(twice)])
    assert result.exit_code == 1 and "configured more than once" in result.output

    result = CliRunner().invoke(main, ["serve", "--corpus", str(corpus_path), "--preset", "nope"])
    assert result.exit_code == 1 and "no preset run 'nope'" in result.output

    # Malformed YAML, or a run the schema refuses: one line naming the file (no traceback).
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("runs: [{name: x\n")
    result = CliRunner().invoke(main, ["serve", "--corpus", str(corpus_path), "--runs", str(malformed)])
    assert result.exit_code == 1 and f"{malformed}: cannot read it as YAML" in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    typo = write_runs(tmp_path / "typo.yaml", run_config("typo", preset="birdy"))
    result = CliRunner().invoke(main, ["serve", "--corpus", str(corpus_path), "--runs", str(typo)])
    assert result.exit_code == 1 and f"{typo}: run 'typo'" in result.output and "birdy" in result.output


def test_a_run_the_corpus_cannot_serve_is_refused_before_the_workers_start(tmp_path, corpus_path):
    long_rows = write_runs(tmp_path / "long.yaml", run_config("long", preset="ntp", seq_len=65536, batch_size=1))
    result = CliRunner().invoke(main, ["serve", "--corpus", str(corpus_path), "--runs", str(long_rows)])
    assert result.exit_code == 1 and "split holds" in result.output and "seq_len = 65536" in result.output


def test_a_store_url_without_a_redis_scheme_is_a_usage_error():
    result = CliRunner().invoke(main, ["serve", "--redis-url", "localhost:6379"])
    assert result.exit_code == 2 and "redis://" in result.output


def test_a_missing_corpus_is_reported(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--corpus", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such prepared corpus" in result.output
