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


def test_a_missing_corpus_is_reported(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--corpus", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such prepared corpus" in result.output
