"""The `birdie` CLI through click's CliRunner against a real local HTTP server."""

from __future__ import annotations

import io
import json

import click
import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

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


def test_every_option_says_what_it_does() -> None:
    for command in [main, *main.commands.values()]:
        for param in command.params:
            if isinstance(param, click.Option) and "--help" not in param.opts:
                assert param.help, f"{command.name} {param.opts[0]} has no help text"


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


def test_batch_decode_shows_each_example_in_panels(birdie, server: FakeBirdieServer) -> None:
    # At the default 80 columns: the objective is named in full above its input and label.
    result = birdie("batch", RUN, "--step", "0", "--decode", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    arrays = batch_arrays(0, 0, 1, "train", 0, server.shape)
    for row in range(server.shape[0]):
        assert f"row {row}, offset 0: {OBJECTIVES[int(arrays['objective_ids'][row, 0])]}" in result.output
    assert "input, read bidirectionally (1 token)" in result.output and "label, generated causally (1 token)" in result.output
    # Special tokens stand out on a terminal: paradigm tokens and markers yellow, sentinels magenta.
    colour = birdie("batch", RUN, "--step", "0", "--decode", env={"FORCE_COLOR": "1"})
    assert "\x1b[1;33m[COPY]\x1b[0m" in colour.output and "\x1b[1;33m[DONE]\x1b[0m" in colour.output
    # Long texts keep their start and end; the cut is said in words, not in brackets like a token.
    short = birdie("batch", RUN, "--step", "0", "--decode", "--max-chars", "10", env={"COLUMNS": "200"})
    assert "[COPY … 16 characters not shown … row 0" in short.output


def test_decoded_text_styles_sentinels() -> None:
    from clients.cli import decoded_text

    text = decoded_text("[R] a[m0] b[m12]c", 0)
    styles = {text.plain[s.start:s.end]: str(s.style) for s in text.spans}
    assert styles == {"[R]": "bold yellow", "[m0]": "bold magenta", "[m12]": "bold magenta"}


def test_validation_batch_title_names_its_objective() -> None:
    from clients.cli import batch_summary
    from clients.wire import WireBatch

    arrays = batch_arrays(0, 0, 1, "validation", 3, (2, 16))
    header = {"run": RUN, "split": "validation", "objective": "copying.len64", "index": 1, "step": None,
              "rank": None, "world_size": None, "mixture_version": None, "objectives": list(OBJECTIVES)}
    out = Console(width=120, file=io.StringIO())
    out.print(batch_summary(WireBatch(arrays, header)))
    title = out.file.getvalue().splitlines()[0]
    assert f"{RUN} validation batch 1 of copying.len64  2x16" in title and "None" not in title


LONG_NAMES = [f"infilling.span{s}.mask{m}.len{n}" for s in (3, 32) for m in (5, 50) for n in (512, 1024)]


def test_tables_never_cut_configuration_or_run_names(birdie, server: FakeBirdieServer) -> None:
    from clients.cli import objectives_table
    from clients.models import ObjectiveInfo

    objectives = [ObjectiveInfo(name=f"autoencoding.deshuffle.{n}", family="autoencoding",
                                params={"family": "autoencoding", "length": 1024, "mean_span": 32.0, "rate": 0.85})
                  for n in LONG_NAMES]
    out = Console(width=80, file=io.StringIO())
    out.print(objectives_table(objectives))
    text = out.file.getvalue()
    assert all(o.name in text for o in objectives)
    assert all(part in text for part in ("length=1024", "mean_span=32.0", "rate=0.85"))
    assert "family=" not in text and "…" not in text  # the family is the name's first part
    # A run name at 80 columns, beside the six other columns.
    long_run = "decoder-ul2-ablation-seed-1"
    httpx.post(f"{server.url}/runs", json={"name": long_run}).raise_for_status()
    result = birdie("runs", env={"COLUMNS": "80"})
    assert result.exit_code == 0 and long_run in result.output


def test_special_tokens_line_folds_the_sentinels() -> None:
    from clients.cli import special_tokens_line

    tokens = {"[PAD]": 0, "[EOD]": 1, **{f"[m{i}]": 18 + i for i in range(256)}, "[X]": 400}
    assert special_tokens_line(tokens) == "[PAD]=0, [EOD]=1, [m0]..[m255]=18..273, [X]=400"
    assert special_tokens_line({"[m0]": 5, "[m1]": 6}) == "[m0]=5, [m1]=6"
    assert special_tokens_line({"[m0]": 5, "[m1]": 6, "[m2]": 9, "[m3]": 10}) == "[m0]=5, [m1]=6, [m2]=9, [m3]=10"
