from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from objective_server.cli import main
from objective_server.corpus import default
from objective_server.corpus.default import default_store_path
from objective_server.corpus.store import TokenStore

from .helpers import SMALL_VOCAB, english_documents, write_jsonl
from .test_default import fake_stdlib  # noqa: F401  (fixture)
from .test_readers import corrupt_gzip


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["prepare", *args], env=env)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_prepare_files_prints_a_summary(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(80), field="body")
    out = tmp_path / "out"
    result = run(str(corpus), "--out", str(out), "--vocab-size", str(SMALL_VOCAB),
                 "--text-field", "body", "--validation-fraction", "0.1", "--seed", "4",
                 "--workers", "1", "--quiet")
    assert result.exit_code == 0, result.output
    store = TokenStore.open(out)
    n = {s: store.split(s).n_docs for s in store.splits}
    tokens = store.split("train").n_tokens
    assert result.stdout.strip().splitlines()[-1].startswith(f"prepared {out}: ")
    assert f"{n['train']} train, {n['validation']} validation" in result.stdout
    assert f"{tokens:,} train" in result.stdout
    assert f"vocab {SMALL_VOCAB}" in result.stdout and "tokens/s" in result.stdout
    assert store.manifest["options"]["seed"] == 4
    assert store.manifest["options"]["validation_fraction"] == 0.1


def test_given_tokenizer_and_txt_docs_per_file(tmp_path: Path) -> None:
    from .test_tokenizer import write_word_level

    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"{i}.txt").write_text("hello\n\nworld\n")
    tokenizer = write_word_level(tmp_path / "tok.json", ["<unk>", "hello", "world"])
    result = run(str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--tokenizer",
                 str(tokenizer), "--txt-docs-per-file", "--quiet")
    assert result.exit_code == 0, result.output
    store = TokenStore.open(tmp_path / "out")
    assert sum(store.split(s).n_docs for s in store.splits) == 4  # one document per file
    assert store.manifest["tokenizer"]["origin"] == "loaded"
    # id 0 is "<unk>" here: the summary says why padding with 0 is still fine.
    assert "note: id 0 is '<unk>'" in result.stderr


def test_help_describes_the_inputs() -> None:
    result = CliRunner().invoke(main, ["prepare", "--help"])
    assert result.exit_code == 0
    for text in (".jsonl", ".parquet", "--vocab-size", "--tokenizer", "--text-field",
                 "--validation-fraction", "--workers", "--txt-docs-per-file", "default corpus"):
        assert text in result.output


def test_missing_input(tmp_path: Path) -> None:
    result = run(str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "nope.jsonl", "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_malformed_input(tmp_path: Path) -> None:
    corpus = tmp_path / "a.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert_one_line_error(run(str(corpus), "--out", str(tmp_path / "out"), "--quiet"),
                          f"{corpus}:2: malformed JSON")
    assert not (tmp_path / "out").exists()


def test_corrupted_gzip_input(tmp_path: Path) -> None:
    corpus = corrupt_gzip(tmp_path / "a.jsonl.gz")
    assert_one_line_error(run(str(corpus), "--out", str(tmp_path / "out"), "--quiet"),
                          f"{corpus}: cannot read (", "invalid distance too far back")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--vocab-size", "700", "--tokenizer", "t.json"], "either a vocab size"),
    (["--validation-fraction", "1.5"], "validation fraction must be in (0, 1)"),
    (["--workers", "0"], "workers must be at least 1"),
])
def test_bad_options(tmp_path: Path, args: list[str], fragment: str) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(10))
    assert_one_line_error(run(str(corpus), "--out", str(tmp_path / "out"), *args), fragment)


def test_out_required_with_inputs(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(10))
    assert_one_line_error(run(str(corpus)), "--out is required")


def test_existing_out(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(10))
    (tmp_path / "out").mkdir()
    assert_one_line_error(run(str(corpus), "--out", str(tmp_path / "out")), "already exists")
    result = run(str(corpus), "--out", str(tmp_path / "out"), "--overwrite", "--quiet",
                 "--vocab-size", str(SMALL_VOCAB))
    assert result.exit_code == 0, result.output


def test_default_corpus_options_are_fixed(tmp_path: Path) -> None:
    assert_one_line_error(run("--vocab-size", "1000", "--seed", "2"), "--vocab-size, --seed",
                          "only for INPUT files")


def test_default_corpus_into_out(fake_stdlib: Path, tmp_path: Path) -> None:  # noqa: F811
    result = run("--out", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 0, result.output
    store = TokenStore.open(tmp_path / "out")
    assert store.manifest["inputs"]["kind"] == "stdlib-docstrings"
    assert Path(store.manifest["inputs"]["root"]) == fake_stdlib


def test_default_corpus_into_the_cache(fake_stdlib: Path, tmp_path: Path) -> None:  # noqa: F811
    env = {"BIRDIE_CACHE": str(tmp_path / "cache")}
    first = run("--quiet", env=env)
    assert first.exit_code == 0, first.output
    path = default_store_path(tmp_path / "cache")
    assert f"prepared {path}:" in first.stdout
    manifest = json.loads((path / "manifest.json").read_text())
    second = run("--quiet", env=env)  # reuses the cached store, and says so (no time, no tokens/s)
    assert second.exit_code == 0
    assert second.stdout.strip() == (
        f"already prepared {path} (reused): documents {manifest['splits']['train']['n_docs']:,} train, "
        f"{manifest['splits']['validation']['n_docs']:,} validation; tokens "
        f"{manifest['splits']['train']['n_tokens']:,} train, {manifest['splits']['validation']['n_tokens']:,} "
        f"validation; vocab {manifest['vocab_size']:,}")
    assert json.loads((path / "manifest.json").read_text()) == manifest
    assert default.default_store_path(tmp_path / "cache") == path


# --- objectives ----------------------------------------------------------------------------------


def objectives(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["objectives", *args], env=env)


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and all(fragment in last for fragment in fragments), result.stderr


def test_objectives_show_refuses_what_it_cannot_show(small_store: TokenStore) -> None:
    corpus = ["--corpus", str(small_store.path)]
    assert_usage_error(objectives("show", "copying.len64", *corpus, "-n", "0"), "-n")
    assert_usage_error(objectives("show", "copying.len64", *corpus, "--seq-len", "0"), "--seq-len")
    assert_usage_error(objectives("show", "copying.len64", *corpus, "--max-chars", "-5"), "--max-chars")
    # A row too short for any example: said, instead of a header and nothing under it.
    assert_usage_error(objectives("show", "copying.len64", *corpus, "--seq-len", "5"),
                       "no example of copying.len64 fits in a row of 5 tokens", "--seq-len")


def test_objectives_show_marks_the_special_tokens(small_store: TokenStore) -> None:
    args = ["show", "infilling.span3.mask15.len128", "--corpus", str(small_store.path), "--seq-len", "256",
            "-n", "1", "--max-chars", "200"]
    plain = objectives(*args, env={"COLUMNS": "100"})
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("infilling.span3.mask15.len128  family infilling  mean_span=3.0  rate=0.15")
    assert "example 0: input, read bidirectionally (" in plain.stdout and "[R]" in plain.stdout
    # The cut is said in words: in decoded text, brackets are tokens.
    assert re.search(r" … [\d,]+ characters not shown … ", plain.stdout)
    assert not re.search(r"\[[\d,]+ characters\]", plain.stdout)
    colour = objectives(*args, env={"FORCE_COLOR": "1", "COLUMNS": "100"})
    assert "\x1b[1;33m[R]\x1b[0m" in colour.stdout and "\x1b[1;35m[m0]\x1b[0m" in colour.stdout


def test_special_tokens_are_told_from_text_that_spells_them(small_store: TokenStore) -> None:
    from objective_server.inspection import special_token_spans

    ids = small_store.special.ids
    first = small_store.encode("the literal text [m0] and [EOD] here")
    parts = [first, [ids["[m0]"]], small_store.encode(" then [m0]"), [ids["[EOD]"]]]
    tokens = np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])
    text = small_store.decode(tokens)
    spans = special_token_spans(tokens, text, small_store.decode, {i: name for name, i in ids.items()})
    real_m0 = text.index("[m0]", len(small_store.decode(first)))
    assert spans == [(real_m0, real_m0 + 4), (len(text) - 5, len(text))]
    assert text.count("[m0]") == 3 and text.count("[EOD]") == 2  # the others are corpus text


def test_objectives_show_says_when_it_prepares_the_default_corpus(fake_stdlib: Path, tmp_path: Path) -> None:  # noqa: F811
    env = {"BIRDIE_CACHE": str(tmp_path / "cache")}
    first = objectives("show", "copying.len64", "-n", "1", "--seq-len", "256", env=env)
    assert first.exit_code == 0, first.output
    assert f"preparing the embedded default corpus into {default_store_path(tmp_path / 'cache')}" in first.stderr
    assert "copying.len64  family copying" in first.stdout
    again = objectives("show", "copying.len64", "-n", "1", "--seq-len", "256", env=env)
    assert again.exit_code == 0 and "preparing" not in again.stderr


def test_objectives_list_counts_in_words() -> None:
    result = objectives("list", "--preset", "ntp")
    assert result.exit_code == 0 and "preset ntp: 1 configuration, L = 2048" in result.stdout


def test_every_option_says_what_it_does() -> None:
    def commands(command):
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from commands(sub)

    for command in commands(main):
        for param in command.params:
            if isinstance(param, click.Option) and "--help" not in param.opts:
                assert param.help, f"{command.name} {param.opts[0]} has no help text"


# --- serve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, env, line", [
    (["--port", "99999"], {}, "Error: --port: Input should be less than or equal to 65535"),
    ([], {"BIRDIE_PORT": "99999"}, "Error: BIRDIE_PORT: Input should be less than or equal to 65535"),
    (["--redis-url", "localhost:6379"], {}, "Error: --redis-url: must be empty, memory:// or start with redis://"),
    (["--workers", "2"], {"BIRDIE_REDIS_URL": ""}, "Error: 2 workers need a shared state store: set BIRDIE_REDIS_URL"),
])
def test_serve_names_a_bad_setting_as_it_was_given(args: list[str], env: dict[str, str], line: str) -> None:
    result = CliRunner().invoke(main, ["serve", *args], env=env)
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(line) and "Value error" not in last, last


def test_progress_leaves_stdout_to_the_summary_and_a_small_vocab_is_noted(tmp_path: Path) -> None:
    """With progress bars on, the tokenizer trainer's (Rust, on file descriptor 1) went to stdout
    as blank lines in front of the summary; and a vocabulary smaller than asked went unremarked."""
    import subprocess
    import sys

    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(40))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "objective_server", "prepare", str(corpus), "--out", str(out),
                           "--vocab-size", "30000", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    vocab = TokenStore.open(out).manifest["vocab_size"]
    assert vocab < 30000
    assert done.stdout.splitlines() == [done.stdout.strip()] and done.stdout.startswith(f"prepared {out}: ")
    assert f"note: the tokenizer has {vocab:,} ids, fewer than the 30,000 asked" in done.stderr
