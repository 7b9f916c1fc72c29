"""The `birdie` CLI through click's CliRunner against a real local HTTP server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from clients.cli import main
from fake_birdie_server import FAMILIES, OBJECTIVES, RUN, FakeBirdieServer, Fault, batch_arrays


@pytest.fixture
def birdie(server: FakeBirdieServer):
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(main, ["--url", server.url, *args], env=env, catch_exceptions=False)

    return run


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("mixture", "runs", "objectives", "batch", "BIRDIE_SERVER_URL"):
        assert command in result.output


def test_runs_table_and_json(birdie, server: FakeBirdieServer) -> None:
    table = birdie("runs")
    assert table.exit_code == 0 and RUN in table.output and "fixed" in table.output
    listed = json.loads(birdie("runs", "--json").output)
    assert [r["name"] for r in listed] == [RUN]


def test_one_run_in_full(birdie) -> None:
    result = birdie("runs", RUN)
    assert result.exit_code == 0
    assert "eval steps: 10, 50" in result.output and "copying.len64" in result.output
    assert json.loads(birdie("runs", RUN, "--json").output)["vocab_size"] == 1024


def test_mixture(birdie) -> None:
    result = birdie("mixture", RUN)
    assert result.exit_code == 0
    assert "0.3333" in result.output and "3.2500" in result.output and "infilling" in result.output
    data = json.loads(birdie("mixture", RUN, "--json").output)
    assert set(data["probabilities"]) == set(OBJECTIVES)


def test_objectives_with_and_without_run(birdie, server: FakeBirdieServer) -> None:
    result = birdie("objectives")
    assert result.exit_code == 0 and all(name in result.output for name in OBJECTIVES)
    data = json.loads(birdie("objectives", "--run", RUN, "--json").output)
    assert [o["family"] for o in data] == ["next_token", "copying", "infilling"]
    assert server.requests("/objectives")[-1].params == {"run": RUN}


def test_batch_summary_counts_positions_per_objective(birdie, server: FakeBirdieServer) -> None:
    result = birdie("batch", RUN, "--step", "3", "--rank", "1", "--world-size", "2")
    assert result.exit_code == 0
    assert "step 3 rank 1/2" in result.output
    arrays = batch_arrays(3, 1, 2, "train", 0, server.shape)
    ids = arrays["objective_ids"]
    for i in np.unique(ids[ids >= 0]):
        positions = int((ids == i).sum())
        labelled = int(((ids == i) & (arrays["label_ids"] != -100)).sum())
        assert any(OBJECTIVES[i] in line and f"{positions}" in line and f"{labelled}" in line for line in result.output.splitlines())


def test_batch_decode_shows_examples(birdie, server: FakeBirdieServer) -> None:
    result = birdie("batch", RUN, "--step", "0", "--decode", env={"COLUMNS": "200"})  # no wrapping
    assert result.exit_code == 0
    # Special tokens in decoded text are shown as text, not swallowed as rich markup.
    assert "[COPY] input text of row 0" in result.output and "label text of row 1 [DONE]" in result.output
    assert server.requests("/batch")[0].params["decode"] == "1"


def test_batch_json_round_trips_the_arrays(birdie, server: FakeBirdieServer) -> None:
    data = json.loads(birdie("batch", RUN, "--step", "5", "--json").output)
    expected = batch_arrays(5, 0, 1, "train", 0, server.shape)
    for name, values in data["arrays"].items():
        np.testing.assert_array_equal(np.asarray(values), expected[name])
    assert data["step"] == 5 and "examples" not in data
    decoded = json.loads(birdie("batch", RUN, "--objective", "next_token", "--index", "1", "--decode", "--json").output)
    assert decoded["split"] == "validation" and len(decoded["examples"]) == server.shape[0]


def test_batch_needs_an_address(birdie, server: FakeBirdieServer) -> None:
    result = birdie("batch", RUN)
    assert result.exit_code == 2 and "--step" in result.output
    assert birdie("batch", RUN, "--step", "1", "--objective", "next_token").exit_code == 2
    assert birdie("batch", RUN, "--step", "1", "--rank", "2", "--world-size", "2").exit_code == 2
    assert server.requests() == []


def test_server_errors_are_one_line_and_non_zero(birdie) -> None:
    result = birdie("mixture", "nope")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: 404 Not Found from GET " + result.output.split("GET ")[1].strip()]
    assert "unknown run 'nope'" in result.output


def test_unreachable_server_is_one_line(down_server: FakeBirdieServer) -> None:
    result = CliRunner().invoke(main, ["--url", down_server.url, "--retries", "1", "runs"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: GET") and down_server.url in lines[0]


def test_transient_errors_are_retried(birdie, server: FakeBirdieServer) -> None:
    server.inject("/runs", Fault(status=503, retry_after="0"), times=2)
    assert birdie("runs").exit_code == 0
    assert len(server.requests("/runs")) == 3


def test_token_from_the_environment() -> None:
    with FakeBirdieServer(token="t0ken") as server:
        runner = CliRunner()
        ok = runner.invoke(main, ["runs", "--json"], env={"BIRDIE_SERVER_URL": server.url, "BIRDIE_API_TOKEN": "t0ken"})
        assert ok.exit_code == 0 and json.loads(ok.output)[0]["name"] == RUN
        denied = runner.invoke(main, ["--url", server.url, "--token", "bad", "runs"], env={"BIRDIE_API_TOKEN": ""})
        assert denied.exit_code == 1 and "401" in denied.output


def test_bad_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["--url", "localhost:1", "runs"])
    assert result.exit_code == 2 and "http://" in result.output


@pytest.mark.parametrize("name, message", [
    ("missing/mixture.png", "No such file or directory"),
    ("mixture.txt", "Format 'txt' is not supported"),
])
def test_a_plot_that_cannot_be_written_is_one_line(birdie, server: FakeBirdieServer, tmp_path, name: str,
                                                  message: str) -> None:
    history = server.history
    server.history = lambda run: {**history(run), "families": FAMILIES}  # what the real server sends
    path = tmp_path / name
    result = birdie("mixture", RUN, "--plot", str(path))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write {path}: ") and message in lines[0]
