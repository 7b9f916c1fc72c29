"""`birdie`: inspect an objective server from the command line.

    birdie runs                          every run on the server
    birdie runs NAME                     one run: config, objectives, eval schedule
    birdie mixture RUN                   current probabilities, losses, rewards
    birdie objectives [--run RUN]        objective configurations
    birdie batch RUN --step N --decode   a batch, its examples decoded to text

Every command takes --json for machine-readable output. The server comes from --url or
$BIRDIE_SERVER_URL, the token from --token or $BIRDIE_API_TOKEN.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from clients.client import DEFAULT_URL, TOKEN_ENV, URL_ENV, BirdieClient, BirdieError
from clients.wire import WireBatch, encode_json

# Label positions that carry no loss (the prefix and padding), as packed by the server.
IGNORE_INDEX = -100

# Special tokens in decoded text: paradigm tokens and markers ("[COPY]", "[EOD]", "[SEP]") and the
# span-corruption sentinels ("[m0]", "[m17]"), styled so that they stand out from the text on a
# terminal (piped output stays plain text).
SENTINEL_PATTERN = r"\[m\d+\]"
SPECIAL_PATTERN = r"\[[A-Z][A-Z_]*\]"


class BirdieGroup(click.Group):
    """Turns client errors into one clear line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BirdieError as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=BirdieGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar=URL_ENV, default=DEFAULT_URL, show_default=True, show_envvar=True, help="Objective server URL.")
@click.option("--token", envvar=TOKEN_ENV, default=None, show_envvar=True, help="API token (sent as a Bearer token).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True, help="Seconds per request attempt.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help="Retries on connection errors and 429/502/503/504.")
@click.option("-v", "--verbose", is_flag=True, help="Log each retry.")
@click.pass_context
def main(ctx: click.Context, url: str, token: str | None, timeout: float, retries: int, verbose: bool) -> None:
    """Inspect a Birdie objective server: runs, mixtures, objectives and batches.

    \b
    Examples:
      birdie runs
      birdie mixture ul2 --json
      birdie --url http://server:8000 batch ul2 --step 0 --decode
    """
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR, format="%(message)s")
    try:
        client = BirdieClient(url, token, timeout=timeout, retries=retries, backoff=0.2)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--url") from error
    ctx.obj = ctx.with_resource(client)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def console() -> Console:
    # Created per command so that it writes to whatever stdout is current (CliRunner swaps it).
    return Console(soft_wrap=False)


def fmt_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@main.command()
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Also draw family probabilities over the steps above the per-family validation loss "
              "into this PNG (needs matplotlib).")
@click.pass_obj
def mixture(client: BirdieClient, run: str, as_json: bool, plot_path: str | None) -> None:
    """Current mixture of RUN: probability, last validation loss and reward per configuration."""
    if plot_path is not None:
        from clients.plot import plot_history

        try:
            written = plot_history(client.mixture_history(run), plot_path)
        except ImportError as e:  # matplotlib is imported on use
            raise click.ClickException(f"--plot needs matplotlib ({e})") from None
        except OSError as e:  # a missing folder, no permission
            raise click.ClickException(f"cannot write {plot_path}: {e.strerror or e}") from None
        except ValueError as e:  # an extension matplotlib has no writer for
            raise click.ClickException(f"cannot write {plot_path}: {e}") from None
        click.echo(f"wrote {written}", err=True)
    m = client.mixture(run)
    if as_json:
        echo_json(m.model_dump(mode="json"))
        return
    out = console()
    out.print(
        f"[bold]{escape(m.run)}[/]  policy [cyan]{escape(m.policy)}[/]  version {m.version}  "
        f"effective from step {m.effective_step}  max served {m.max_served}"
        + ("" if m.exploration is None else f"  exploration {m.exploration:.3f}")
    )
    table = Table("configuration", "probability", "last loss", "reward")
    table.columns[0].no_wrap = True  # names differ only at their end: never cut them
    for name, p in m.probabilities.items():
        table.add_row(Text(name), f"{p:.4f}", fmt_number(m.last_losses.get(name)), fmt_number(m.rewards.get(name)))
    out.print(table)
    families = Table("family", "probability")
    for family, p in m.families.items():
        families.add_row(Text(family), f"{p:.4f}")
    out.print(families)


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.pass_obj
def runs(client: BirdieClient, name: str | None, as_json: bool) -> None:
    """List the server's runs, or show run NAME in full."""
    if name is not None:
        info = client.run(name)
        if as_json:
            echo_json(info.model_dump(mode="json"))
            return
        out = console()
        out.print(
            f"[bold]{escape(info.name)}[/]  mixture version {info.mixture_version}  max served {info.max_served}  "
            f"vocab {info.vocab_size}"
        )
        out.print(f"eval steps: {', '.join(map(str, info.eval_steps)) or '-'}")
        out.print(Text("special tokens: " + special_tokens_line(info.special_tokens)))
        config = {k: v for k, v in info.config.items() if k != "arms"}
        out.print(Text("config: " + json.dumps(config, sort_keys=True)))
        out.print(objectives_table(info.objectives))
        return
    summaries = client.runs()
    if as_json:
        echo_json([s.model_dump(mode="json") for s in summaries])
        return
    table = Table("run", "policy", "objectives", "seq_len", "batch", "mixture version", "max served")
    table.columns[0].no_wrap = True
    for s in summaries:
        table.add_row(Text(s.name), Text(s.policy), str(s.objectives), str(s.seq_len), str(s.batch_size), str(s.mixture_version), str(s.max_served))
    console().print(table)
    for s in summaries:
        if s.unservable:
            console().print(Text(f"{s.name}: not served here: {s.unservable}"))


def special_tokens_line(tokens: dict[str, int]) -> str:
    """`[PAD]=0, [EOD]=1, ..., [m0]..[m255]=18..273`: consecutive sentinels as one range."""
    parts: list[str] = []
    items = list(tokens.items())
    i = 0
    while i < len(items):
        name, value = items[i]
        j = i
        if re.fullmatch(SENTINEL_PATTERN, name):
            first = int(name[2:-1])
            while (j + 1 < len(items) and items[j + 1][0] == f"[m{first + j + 1 - i}]"
                   and items[j + 1][1] == value + j + 1 - i):
                j += 1
        if j - i >= 2:
            parts.append(f"{name}..{items[j][0]}={value}..{items[j][1]}")
        else:
            parts.extend(f"{k}={v}" for k, v in items[i:j + 1])
        i = j + 1
    return ", ".join(parts)


def objectives_table(objectives: list) -> Table:
    """Name and parameters; the family is the name's first part (--json has it as a field)."""
    table = Table("configuration", "parameters")
    table.columns[0].no_wrap = True  # names differ only at their end: never cut them
    table.columns[1].overflow = "fold"  # a narrow column wraps parameters instead of cutting them
    for o in objectives:
        params = "  ".join(f"{k}={v}" for k, v in sorted(o.params.items()) if k != "family")
        table.add_row(Text(o.name), Text(params))
    return table


@main.command()
@click.option("--run", default=None, help="Only this run's configurations (default: every preset's).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.pass_obj
def objectives(client: BirdieClient, run: str | None, as_json: bool) -> None:
    """Objective configurations known to the server (or used by --run)."""
    items = client.objectives(run)
    if as_json:
        echo_json([o.model_dump(mode="json") for o in items])
        return
    console().print(objectives_table(items))


@main.command()
@click.argument("run")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Training step (required unless --objective).")
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="The trainer rank whose share of the step to fetch.")
@click.option("--world-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many ranks the step is split among.")
@click.option("--objective", default=None, help="A validation batch of this configuration instead.")
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True, help="Which validation batch.")
@click.option("--decode", is_flag=True, help="Show every packed example decoded to text: its input (the "
              "bidirectional prefix) and its label (the causal suffix).")
@click.option("--max-chars", type=click.IntRange(min=0), default=800, show_default=True,
              help="With --decode: shorten longer texts to their start and end (0: never; --json: never).")
@click.option("--json", "as_json", is_flag=True, help="Print the batch as JSON (arrays as lists).")
@click.option(
    "--serve", is_flag=True,
    help="Take the training batch as a trainer does, marking its step served (a mixture published later then "
    "takes effect only after it). Without it the batch is previewed: a look that changes nothing.",
)
@click.pass_obj
def batch(
    client: BirdieClient,
    run: str,
    step: int | None,
    rank: int,
    world_size: int,
    objective: str | None,
    index: int,
    decode: bool,
    max_chars: int,
    as_json: bool,
    serve: bool,
) -> None:
    """Fetch one batch of RUN by its address and summarise it (or --decode its examples).

    A training batch is previewed unless --serve is given: looking at step 9000 of a run at step 10
    must not push the run's next mixture past step 9000. A previewed step beyond the highest served
    is provisional: a mixture published before the trainers reach it changes it.

    With --decode, each example is its input panel then its label panel. On a terminal, special
    tokens stand out: paradigm tokens and markers ([R], [COPY], [SEP], [EOD]) in yellow, span
    sentinels ([m0], [m1], ...) in magenta (text that spells one, like "[X]", is coloured too).
    """
    if step is None and objective is None:
        raise click.UsageError("give --step N for a training batch or --objective NAME for a validation batch")
    if step is not None and objective is not None:
        raise click.UsageError("--step and --objective exclude each other")
    if rank >= world_size:
        raise click.UsageError(f"--rank must be below --world-size ({rank} >= {world_size})")
    examples: list[dict] | None = None
    if decode:
        wire, examples = client.decoded_batch(
            run, step, rank, world_size, objective=objective, index=index, preview=not serve
        )
    elif objective is not None:
        wire = client.validation_batch(run, objective, index)
    else:
        wire = client.batch(run, step, rank, world_size, preview=not serve)
    if as_json:
        echo_json(encode_json(wire.arrays, wire.header, examples))
        return
    out = console()
    out.print(batch_summary(wire))
    for e in examples or ():
        out.print(Text(f"row {e.get('row')}, offset {e.get('offset')}: {e.get('objective')}", style="bold"))
        for panel in example_panels(e, max_chars):
            out.print(panel)


def plural(count: int | None, noun: str) -> str:
    return f"{'?' if count is None else count} {noun}{'' if count == 1 else 's'}"


def example_panels(example: dict, max_chars: int, heading: str = "") -> list[Panel]:
    """The input panel (the bidirectional prefix, its title after `heading`) and the label panel
    (the causal suffix) of a decoded example; its "input_special" / "label_special" character
    spans, where given, say exactly where the special tokens are."""
    return [
        Panel(decoded_text(example.get(part, ""), max_chars, example.get(f"{part}_special")), border_style=style,
              title_align="left", title=f"{title} ({plural(example.get(f'{part}_tokens'), 'token')})")
        for part, title, style in (("input", f"{heading}input, read bidirectionally", "cyan"),
                                   ("label", "label, generated causally", "green"))
    ]


def decoded_text(text: str, max_chars: int, special: list[tuple[int, int]] | None = None) -> Text:
    """Decoded text as a rich Text (not markup: "[COPY]" is a token) with its special tokens styled
    (the [start, end) spans given, else whatever looks like one), the middle of a text longer than
    max_chars (0: no limit) left out and said so."""
    out = Text(text)
    if special is None:
        out.highlight_regex(SPECIAL_PATTERN, "bold yellow")
        out.highlight_regex(SENTINEL_PATTERN, "bold magenta")
    for start, end in special or ():
        sentinel = re.fullmatch(SENTINEL_PATTERN, text[start:end]) is not None
        out.stylize("bold magenta" if sentinel else "bold yellow", start, end)
    if max_chars and len(text) > max_chars:
        half = max_chars // 2
        shortened = out[:half]
        # No brackets: in decoded text, brackets are special tokens.
        shortened.append(f" … {len(text) - 2 * half:,} characters not shown … ", style="dim italic")
        shortened.append_text(out[len(text) - half:])
        out = shortened
    return out


def batch_summary(wire: WireBatch) -> Table:
    """Header fields, then positions and loss-bearing tokens per objective configuration."""
    h = wire.header
    rows, length = wire.shape
    if h.get("split") == "validation":
        title = f"{h.get('run')} validation batch {h.get('index')} of {h.get('objective')}  {rows}x{length}"
    else:
        title = (
            f"{h.get('run')} {h.get('split', 'train')} step {h.get('step')} rank {h.get('rank')}/{h.get('world_size')} "
            f"mixture v{h.get('mixture_version')}  {rows}x{length}"
        )
    if h.get("fill_rate") is not None:
        title += f"  fill {h['fill_rate']:.1%}"
    if h.get("provisional"):
        title += "  (provisional: beyond the highest step served, a new mixture may still change it)"
    ids = wire["objective_ids"]
    names = wire.objectives
    size = max(len(names), int(ids.max()) + 1 if ids.size else 0)
    positions = np.bincount(ids[ids >= 0], minlength=size)
    labelled = np.bincount(ids[(ids >= 0) & (wire["label_ids"] != IGNORE_INDEX)], minlength=size)
    table = Table("objective", "positions", "label tokens", title=Text(title))
    for i in np.flatnonzero(positions):
        table.add_row(Text(names[i] if i < len(names) else f"#{i}"), str(positions[i]), str(labelled[i]))
    return table
