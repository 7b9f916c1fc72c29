"""`birdie-server`: the server-side command line (prepare a corpus, inspect objectives, serve)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Birdie objective server: prepare corpora, inspect objectives, serve batches."""


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
    """Every configuration of a preset: name, family, initial probability and parameters."""
    import json

    from rich.console import Console
    from rich.table import Table

    from objective_server.objectives.presets import preset

    try:
        arms = preset(preset_name, seq_len=seq_len)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    rows = [{"name": o.name, "family": o.family, "probability": p, "params": o.params()} for o, p in arms]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"preset {preset_name}: {len(rows)} configurations, L = {seq_len}")
    table.add_column("configuration")
    table.add_column("family")
    table.add_column("initial p", justify="right")
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['probability']:.4f}")
    Console().print(table)


@objectives.command("show")
@click.argument("name")
@click.option("-n", "count", default=3, show_default=True, help="How many examples.")
@click.option("--corpus", type=click.Path(exists=True, file_okay=False),
              help="A prepared token store (default: the embedded default corpus).")
@click.option("--seq-len", default=2048, show_default=True, help="Row length examples are packed into.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-chars", default=800, show_default=True, help="Shorten long texts in the table (0: never).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (full texts) for machines.")
def objectives_show(name: str, count: int, corpus: str | None, seq_len: int, seed: int, max_chars: int,
                    as_json: bool) -> None:
    """Decoded input (bidirectional prefix) and label (causal suffix) of NAME's first examples.

    NAME is a configuration name such as `infilling.span3.mask15.len512` (see `objectives list`).
    Examples come from the training split, packed exactly as a trainer receives them.
    """
    import json

    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    from objective_server.batching import validation_batch
    from objective_server.inspection import decoded_examples
    from objective_server.objectives import parse_objective

    try:
        objective = parse_objective(name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    store = _open_corpus(corpus)
    tokens = store.split("train").tokens
    examples: list[dict] = []
    index = 0
    while len(examples) < count and index < count + 10:
        batch = validation_batch(objective, 0, tokens, store.special, seed=seed, batch_size=1,
                                 seq_len=seq_len, index=index)
        examples += decoded_examples(batch, store.decode, [objective.name], limit=count - len(examples))
        index += 1
    if as_json:
        click.echo(json.dumps({"objective": objective.name, "family": objective.family,
                               "params": objective.params(), "examples": examples}, indent=2))
        return
    console = Console()
    # Decoded text is shown as plain Text: "[m0]" and "[GEN]" are tokens, not Rich markup.
    console.print(Text(f"{objective.name}  family {objective.family}  {objective.params()}", style="bold"))
    for i, ex in enumerate(examples):
        console.print(Panel(Text(_shorten(ex["input"], max_chars)), border_style="cyan", title_align="left",
                            title=f"example {i}: input, read bidirectionally ({ex['input_tokens']} tokens)"))
        console.print(Panel(Text(_shorten(ex["label"], max_chars)), border_style="green", title_align="left",
                            title=f"label, generated causally ({ex['label_tokens']} tokens)"))


def _shorten(text: str, max_chars: int) -> str:
    if not max_chars or len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} … [{len(text) - 2 * half} characters] … {text[-half:]}"


def _open_corpus(path: str | None):
    """The prepared store at `path`, or the embedded default corpus (prepared on first use)."""
    from objective_server.corpus.errors import CorpusError
    from objective_server.corpus.store import TokenStore

    try:
        if path:
            return TokenStore.open(path)
        from objective_server.corpus.default import default_store

        return default_store()
    except CorpusError as e:
        raise click.ClickException(str(e)) from None
