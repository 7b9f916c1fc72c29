"""`birdie-server`: the server-side command line (prepare a corpus, inspect objectives, serve)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Birdie objective server: prepare corpora, inspect objectives, serve batches."""


# --- prepare -------------------------------------------------------------------------------------


class _BadInput(click.ClickException):
    """One line on stderr, exit status 2 (bad input, like click's usage errors)."""

    exit_code = 2


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=str))
@click.option("--out", type=click.Path(file_okay=False, path_type=str),
              help="Folder to write the prepared corpus to (must not exist unless --overwrite). "
                   "Without INPUT it defaults to the cache ($BIRDIE_CACHE or ~/.cache/birdie).")
@click.option("--vocab-size", type=int, default=None,
              help="Train a byte-level BPE with this many ids (default 8192).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False, path_type=str),
              help="Use this tokenizer.json instead of training one (missing special tokens are "
                   "appended).")
@click.option("--text-field", default="text", show_default=True,
              help="JSON Lines field / Parquet column that holds the text.")
@click.option("--validation-fraction", type=float, default=0.01, show_default=True,
              help="Share of documents held out for validation (at least one document).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Chooses the held-out documents and the tokenizer's training sample.")
@click.option("--workers", type=int, default=None,
              help="Encoding processes (default: one per core for large corpora).")
@click.option("--txt-docs-per-file", is_flag=True,
              help="Each .txt file is one document (default: documents are separated by blank "
                   "lines).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prepare(inputs: tuple[str, ...], out: str | None, vocab_size: int | None,
            tokenizer_path: str | None, text_field: str, validation_fraction: float, seed: int,
            workers: int | None, txt_docs_per_file: bool, overwrite: bool, quiet: bool) -> None:
    """Tokenize INPUT files or folders into a memory-mapped token store.

    INPUT: .txt (documents separated by blank lines), .jsonl/.json (one JSON object per line),
    .parquet, optionally gzipped (.txt.gz, .jsonl.gz); folders are read recursively in sorted
    order. Without INPUT, prepares the embedded default corpus (the Python standard library's
    docstrings).

    Writes tokenizer.json, manifest.json and train/validation .tokens (token ids, an [EOD] after
    every document) and .docs (document offsets).

    \b
    Examples:
      birdie-server prepare data/ --out corpus/
      birdie-server prepare books.jsonl.gz --out corpus/ --tokenizer tokenizer.json
      birdie-server prepare            # the default corpus, into the cache
    """
    import time

    from objective_server.corpus.errors import CorpusError

    started = time.perf_counter()
    reused = False
    try:
        if inputs:
            if out is None:
                raise _BadInput("--out is required when INPUT is given")
            from objective_server.corpus.prepare import prepare_corpus

            summary = prepare_corpus(
                list(inputs), out, vocab_size=vocab_size, tokenizer=tokenizer_path,
                validation_fraction=validation_fraction, seed=seed, workers=workers,
                text_field=text_field, txt_docs_per_file=txt_docs_per_file,
                overwrite=overwrite, progress=not quiet,
            )
        else:
            from objective_server.corpus import default

            context = click.get_current_context()
            given = [
                "--" + name.replace("_", "-").removesuffix("-path")
                for name in ("vocab_size", "tokenizer_path", "text_field", "validation_fraction",
                             "seed", "txt_docs_per_file")
                if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
            ]
            if given:
                raise _BadInput(f"{', '.join(given)}: only for INPUT files; the default corpus "
                                "has fixed options (vocab 8192)")
            if out is not None:
                summary = default.prepare_default_corpus(out, workers=workers,
                                                         overwrite=overwrite, progress=not quiet)
            else:
                from objective_server.corpus.prepare import PrepareSummary

                manifest = default.default_store_path() / "manifest.json"
                before = manifest.stat().st_mtime_ns if manifest.exists() else None
                store = default.default_store(progress=not quiet)
                summary = PrepareSummary.of_manifest(store.path, store.manifest,
                                                     time.perf_counter() - started)
                reused = before is not None and manifest.stat().st_mtime_ns == before
    except CorpusError as e:
        raise _BadInput(str(e)) from None
    if reused:  # opened, not prepared: no time or tokens/s (416 million tokens/s said nothing)
        click.echo(f"already prepared {summary.path} (reused): documents "
                   + ", ".join(f"{n:,} {split}" for split, n in summary.n_docs.items()) + "; tokens "
                   + ", ".join(f"{n:,} {split}" for split, n in summary.n_tokens.items())
                   + f"; vocab {summary.vocab_size:,}")
    else:
        click.echo(summary.describe())
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)


# --- objectives ----------------------------------------------------------------------------------


@main.group()
def objectives() -> None:
    """List objective configurations and show decoded examples of what they produce."""


@objectives.command("list")
@click.option("--preset", "preset_name", default="birdie", show_default=True,
              help="Preset whose configurations to list (birdie, ul2, decoder-ul2, ntp).")
@click.option("--seq-len", default=2048, show_default=True, help="Row length the preset is sized for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def objectives_list(preset_name: str, seq_len: int, as_json: bool) -> None:
    """Every configuration of a preset: name, family and initial probability (--json adds the
    parameters; the name states them too)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from clients.cli import plural
    from objective_server.objectives.presets import preset

    try:
        arms = preset(preset_name, seq_len=seq_len)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    rows = [{"name": o.name, "family": o.family, "probability": p, "params": o.params()} for o, p in arms]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"preset {preset_name}: {plural(len(rows), 'configuration')}, L = {seq_len}")
    table.add_column("configuration", no_wrap=True)  # names differ only at their end: never cut them
    table.add_column("family")
    table.add_column("initial p", justify="right")
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['probability']:.4f}")
    Console().print(table)


@objectives.command("show")
@click.argument("name")
@click.option("-n", "count", type=click.IntRange(min=1), default=3, show_default=True, help="How many examples.")
@click.option("--corpus", type=click.Path(exists=True, file_okay=False),
              help="A prepared token store (default: the embedded default corpus).")
@click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Row length examples are packed into.")
@click.option("--seed", default=0, show_default=True,
              help="Seeds the examples' randomness (which spans are masked, shuffled or queried).")
@click.option("--max-chars", type=click.IntRange(min=0), default=800, show_default=True,
              help="Shorten longer texts to their start and end (0: never; --json: never).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (full texts) for machines.")
def objectives_show(name: str, count: int, corpus: str | None, seq_len: int, seed: int, max_chars: int,
                    as_json: bool) -> None:
    """Decoded input (bidirectional prefix) and label (causal suffix) of NAME's first examples.

    NAME is a configuration name such as `infilling.span3.mask15.len512` (see `objectives list`).
    Examples come from the training split, packed exactly as a trainer receives them. On a
    terminal, special tokens stand out: paradigm tokens and markers ([R], [COPY], [SEP], [EOD])
    in yellow, span sentinels ([m0], [m1], ...) in magenta; corpus text that spells one does not.
    """
    import json

    from rich.console import Console
    from rich.text import Text

    from clients.cli import example_panels
    from objective_server.batching import validation_batch
    from objective_server.inspection import decoded_examples
    from objective_server.objectives import parse_objective

    try:
        objective = parse_objective(name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    store = _open_corpus(corpus)
    tokens = store.split("train").tokens
    special = None if as_json else {i: name for name, i in store.special.ids.items()}
    examples: list[dict] = []
    index = 0
    while len(examples) < count and index < count + 10:
        batch = validation_batch(objective, 0, tokens, store.special, seed=seed, batch_size=1,
                                 seq_len=seq_len, index=index)
        examples += decoded_examples(batch, store.decode, [objective.name], limit=count - len(examples),
                                     special=special)
        index += 1
    if not examples:
        raise click.UsageError(f"no example of {objective.name} fits in a row of {seq_len} tokens; "
                               "give a larger --seq-len")
    if as_json:
        click.echo(json.dumps({"objective": objective.name, "family": objective.family,
                               "params": objective.params(), "examples": examples}, indent=2))
        return
    console = Console()
    params = "  ".join(f"{k}={v}" for k, v in objective.params().items() if k != "family")
    console.print(Text(f"{objective.name}  family {objective.family}  {params}", style="bold"))
    for i, ex in enumerate(examples):
        for panel in example_panels(ex, max_chars, heading=f"example {i}: "):
            console.print(panel)


def _open_corpus(path: str | None):
    """The prepared store at `path`, or the embedded default corpus (prepared on first use)."""
    from objective_server.corpus.errors import CorpusError
    from objective_server.corpus.store import TokenStore

    try:
        if path:
            return TokenStore.open(path)
        from objective_server.corpus.default import default_store, default_store_path

        if not default_store_path().exists():  # else a first look waits a minute in silence
            click.echo(f"preparing the embedded default corpus into {default_store_path()} "
                       "(once: about a minute; --corpus DIR takes another)", err=True)
        return default_store(progress=True)
    except CorpusError as e:
        raise click.ClickException(str(e)) from None


# --- serve ---------------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="Address to bind.  [env BIRDIE_HOST; default 127.0.0.1]")
@click.option("--port", type=int, help="Port to bind.  [env BIRDIE_PORT; default 8000]")
@click.option("--workers", type=int,
              help="uvicorn worker processes; more than 1 needs --redis-url.  [env BIRDIE_WORKERS; default 1]")
@click.option("--redis-url", help="Shared run-state store, e.g. redis://localhost:6379/0.  "
              "[env BIRDIE_REDIS_URL; default: in-process store]")
@click.option("--corpus", type=click.Path(file_okay=False),
              help="A prepared token store.  [env BIRDIE_CORPUS; default: the embedded default corpus]")
@click.option("--runs", "run_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Run config file (YAML/TOML) to register; repeatable.  [env BIRDIE_RUN_FILES, comma-separated]")
@click.option("--preset", "presets", multiple=True,
              help="Register a shipped preset run (birdie, ul2, decoder-ul2, ntp); repeatable.  [env BIRDIE_PRESETS; default: all four]")
@click.option("--api-token", help="Require `Authorization: Bearer TOKEN` on every route but /healthz and "
              "/readyz (prefer the env variable: arguments show in `ps`).  [env BIRDIE_API_TOKEN]")
@click.option("--generation-executor", type=click.Choice(["auto", "process", "thread"]),
              help="Where batches are generated; auto: processes for one worker, threads for several.  "
              "[env BIRDIE_GENERATION_EXECUTOR; default auto]")
@click.option("--generation-workers", type=int, help="Generation processes/threads per server worker.  "
              "[env BIRDIE_GENERATION_WORKERS; default 2]")
@click.option("--prefetch-depth", type=int, help="Steps generated ahead per rank.  [env BIRDIE_PREFETCH_DEPTH; default 2]")
@click.option("--cache-size", type=int, help="Recent batches kept per worker.  [env BIRDIE_CACHE_SIZE; default 128]")
@click.option("--max-request-tokens", type=int,
              help="Largest batch_size * seq_len served.  [env BIRDIE_MAX_REQUEST_TOKENS; default 1048576]")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="[env BIRDIE_LOG_LEVEL; default info]")
@click.option("--access-log/--no-access-log", default=None, help="Log every request.  [env BIRDIE_ACCESS_LOG]")
def serve(**options) -> None:
    """Serve addressed batches and take loss posts over HTTP (FastAPI on uvicorn; OpenAPI at /docs).

    Options override the BIRDIE_* environment variables, which override the defaults.
    """
    import pydantic

    from objective_server.app import serve as run_server
    from objective_server.corpus.errors import CorpusError
    from objective_server.settings import Settings

    given = {name: value for name, value in options.items() if value not in (None, ())}
    try:
        settings = Settings(**given)
    except pydantic.ValidationError as e:
        raise click.UsageError(_settings_problems(e, given)) from None
    try:
        run_server(settings)
    except (CorpusError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def _settings_problems(error, given: dict) -> str:
    """Each invalid setting named as the user gave it (the option, else its BIRDIE_* variable), then
    pydantic's message without its "Value error, " prefix."""
    from objective_server.settings import ENV_PREFIX

    options = {p.name: p.opts[0] for p in click.get_current_context().command.params}
    problems = []
    for err in error.errors():
        message = err["msg"].removeprefix("Value error, ")
        field = str(err["loc"][0]) if err["loc"] else None
        if field is None:
            problems.append(message)
        elif field in given and field in options:
            problems.append(f"{options[field]}: {message}")
        else:
            problems.append(f"{ENV_PREFIX}{field.upper()}: {message}")
    return "; ".join(problems)
