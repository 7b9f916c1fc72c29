"""Evaluations: per-configuration validation loss and token accuracy, copying and selective
copying accuracy, and multi-number phone-book lookup (birdie-method.md §6).

- Validation batches come from the server (`split=validation`), in exactly the training format:
  teacher-forced, loss only on suffix positions. `score_batches` gives, per objective
  configuration, the token-weighted mean loss and the accuracy of greedy (argmax) predictions.
  Copying and selective-copying accuracy are those accuracies for the configurations of those
  families.
- Phone-book lookup: the prompt (built with the run's tokenizer, `trainer.phonebook`) is read in
  the bidirectional prefix, the answer is decoded greedily in the suffix, recurrently for the
  SSMs (`prefill` + `step`), by re-running the forward pass for the Transformer. Optionally
  after the paper's short phone-book fine-tune (`finetune_phone_book`).

    birdie-eval runs/demo/checkpoints/step_00000300.pt --finetune-steps 100 --out eval.json
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clients.plot import family_means
from objective_server.special_tokens import DONE, EOD, GENERATE
from trainer import phonebook
from trainer.models import LanguageModel, RecurrentLM
from trainer.models.common import IGNORE_INDEX, PREFIX, SUFFIX

BATCH_FIELDS = ("input_ids", "label_ids", "attention_mask", "segment_ids", "position_ids", "objective_ids")
RETRIEVAL_FAMILIES = ("copying", "selective_copying")


# ---------------------------------------------------------------------------------------------
# Teacher-forced scores of packed batches
# ---------------------------------------------------------------------------------------------


def batch_tensors(arrays: dict[str, np.ndarray], device: torch.device | str) -> dict[str, Tensor]:
    """The six (B, L) int32 arrays of a batch as int64 tensors on `device`."""
    missing = [name for name in BATCH_FIELDS if name not in arrays]
    if missing:
        raise ValueError(f"batch lacks the arrays {missing}")
    # astype copies: wire arrays are read-only views of the received buffer.
    return {name: torch.from_numpy(np.asarray(arrays[name]).astype(np.int64)).to(device) for name in BATCH_FIELDS}


def forward_logits(model: LanguageModel, batch: dict[str, Tensor]) -> Tensor:
    """Logits of a packed batch (bf16 autocast on CUDA; the loss is computed in float32 later)."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        return model(batch["input_ids"], batch["attention_mask"], batch["segment_ids"], batch["position_ids"])


def token_losses(logits: Tensor, label_ids: Tensor) -> Tensor:
    """Cross-entropy per position (B, L), float32, 0 where there is no label."""
    return F.cross_entropy(
        logits.float().flatten(0, -2), label_ids.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(label_ids.shape)


def per_objective_sums(values: Tensor, label_ids: Tensor, objective_ids: Tensor, n_objectives: int) -> tuple[Tensor, Tensor]:
    """(sum of `values`, number of labelled tokens) per objective id, float64 (n_objectives,).

    Only positions with a label count; their objective id must lie in [0, n_objectives)."""
    labelled = label_ids != IGNORE_INDEX
    ids = objective_ids[labelled]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_objectives):
        raise ValueError(f"objective ids of labelled tokens must lie in [0, {n_objectives}), got {ids.min()}..{ids.max()}")
    sums = torch.bincount(ids, weights=values[labelled].double(), minlength=n_objectives)
    counts = torch.bincount(ids, minlength=n_objectives).double()
    return sums, counts


@dataclass(frozen=True)
class ObjectiveScore:
    """Teacher-forced score of one objective configuration on its validation tokens."""

    loss: float  # token-weighted mean cross-entropy over suffix tokens
    accuracy: float  # share of suffix tokens whose argmax prediction is the label
    tokens: int


@torch.no_grad()
def score_batches(
    model: LanguageModel, batches: Iterable, device: torch.device | str, rows: int | None = None
) -> dict[str, ObjectiveScore]:
    """Per objective configuration (by name): loss and greedy token accuracy over the labelled
    (suffix) positions of `batches` (WireBatches: `.arrays` and `.header["objectives"]`).

    `rows`: score only the first `rows` rows of each batch (cheaper evaluations on a CPU)."""
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    was_training = model.training
    model.eval()
    totals: dict[str, list[float]] = {}
    try:
        for batch in batches:
            names = list(batch.header["objectives"])
            tensors = batch_tensors({name: a[:rows] for name, a in batch.arrays.items()}, device)
            logits = forward_logits(model, tensors)
            labels = tensors["label_ids"]
            correct = (logits.argmax(dim=-1) == labels).double()
            loss_sums, counts = per_objective_sums(token_losses(logits, labels), labels, tensors["objective_ids"], len(names))
            correct_sums, _ = per_objective_sums(correct, labels, tensors["objective_ids"], len(names))
            for i in torch.nonzero(counts).flatten().tolist():
                total = totals.setdefault(names[i], [0.0, 0.0, 0.0])
                total[0] += float(loss_sums[i])
                total[1] += float(correct_sums[i])
                total[2] += float(counts[i])
    finally:
        model.train(was_training)
    return {
        name: ObjectiveScore(loss=loss / count, accuracy=right / count, tokens=int(count))
        for name, (loss, right, count) in totals.items()
    }


def fetch_validation_batches(client, run: str, objectives: Sequence[str], n_batches: int) -> list:
    """The run's fixed validation batches: `n_batches` per configuration, in order."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    return [client.validation_batch(run, name, index) for name in objectives for index in range(n_batches)]


# ---------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_decode(
    model: LanguageModel, prefix_ids: Sequence[int], generate_id: int, max_new_tokens: int, stop_ids: Iterable[int] = ()
) -> list[int]:
    """Greedy answer to one prefix: the prefix is read as the bidirectional region, then [GEN]
    and the generated tokens as the causal suffix, until a stop token (kept) or max_new_tokens.

    Recurrent models decode in O(1) per token from their state; others re-run the forward pass."""
    if len(prefix_ids) < 1 or max_new_tokens < 1:
        raise ValueError("need a non-empty prefix and max_new_tokens >= 1")
    stop = set(stop_ids)
    device = next(model.parameters()).device
    prefix = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    generated: list[int] = []
    try:
        if isinstance(model, RecurrentLM):
            _, state = model.prefill(prefix)
            token = generate_id
            for _ in range(max_new_tokens):
                logits, state = model.step(torch.tensor([token], device=device), state)
                token = int(logits[0].argmax())
                generated.append(token)
                if token in stop:
                    break
        else:
            sequence = [*prefix_ids, generate_id]
            for _ in range(max_new_tokens):
                ids = torch.tensor([sequence], dtype=torch.long, device=device)
                mask = torch.full_like(ids, SUFFIX)
                mask[:, : len(prefix_ids)] = PREFIX
                token = int(model(ids, mask)[0, -1].argmax())
                generated.append(token)
                sequence.append(token)
                if token in stop:
                    break
    finally:
        model.train(was_training)
    return generated


# ---------------------------------------------------------------------------------------------
# Phone-book lookup
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhoneBookResult:
    numbers: int  # numbers asked for
    entries: int  # entries in the book
    digit_accuracy: float  # mean over the examples
    examples: int
    prompt_tokens: float  # mean prefix length
    sample_answer: str  # the first example's expected answer ...
    sample_generated: str  # ... and what the model generated


def phone_book_lookup(
    model: LanguageModel,
    tokenizer,
    special: dict[str, int],
    *,
    numbers: Sequence[int] = (1, 2, 4, 8, 16, 32),
    entries: int = 20,
    examples: int = 20,
    seed: int = 0,
) -> list[PhoneBookResult]:
    """Digit accuracy of greedy answers for each question size in `numbers` (books of
    max(entries, n) entries), `examples` books each, the same books on every host."""
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    with one_cpu_thread(next(model.parameters()).device):
        return [_phone_book_size(model, tokenizer, special, n, max(entries, n), examples, seed) for n in numbers]


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Decoding on a CPU is a long chain of tiny ops: one thread avoids the thread pool's
    synchronisation per op, which costs milliseconds each on a busy machine (25x slower decoding
    with 2 threads on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _phone_book_size(model, tokenizer, special, n: int, n_entries: int, examples: int, seed: int) -> PhoneBookResult:
    accuracies, lengths = [], []
    sample = ("", "")
    for index in range(examples):
        book = phonebook.phone_book(seed, n, n_entries, index)
        example = phonebook.encode_phone_book(book, tokenizer, special)
        # Room for the answer and a little more: a model that never stops is cut off.
        budget = len(example.label) + 8
        generated = greedy_decode(model, example.input.tolist(), special[GENERATE], budget, (special[DONE], special[EOD]))
        text = tokenizer.decode(generated, skip_special_tokens=True)
        accuracies.append(phonebook.digit_accuracy(text, book.answer()))
        lengths.append(len(example.input))
        if index == 0:
            sample = (book.answer(), text)
    return PhoneBookResult(n, n_entries, float(np.mean(accuracies)), examples, float(np.mean(lengths)), *sample)


def finetune_phone_book(
    model: LanguageModel,
    tokenizer,
    special: dict[str, int],
    *,
    steps: int,
    batch_size: int = 8,
    seq_len: int = 512,
    numbers: Sequence[int] = (1, 2, 4, 8),
    entries: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """The paper's short phone-book fine-tune: `steps` AdamW steps (no weight decay, constant lr
    after a 10 % warmup, gradient clipping at 1) of teacher-forced training on packed synthetic
    phone books; trains `model` in place and returns the losses."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    model.train()
    bar = _progress(steps, "phone-book fine-tune", progress)
    for step in range(steps):
        batch = phonebook.finetune_batch(
            tokenizer, special, seed=seed, step=step, batch_size=batch_size, seq_len=seq_len,
            numbers=tuple(numbers), n_entries=entries,
        )
        tensors = batch_tensors(batch.arrays(), device)
        logits = forward_logits(model, tensors)
        labels = tensors["label_ids"]
        loss = token_losses(logits, labels).sum() / (labels != IGNORE_INDEX).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"phone-book fine-tune loss is {losses[-1]} at step {step}")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The whole evaluation of one model on one run
# ---------------------------------------------------------------------------------------------


@dataclass
class EvaluationOptions:
    validation_batches: int = 1  # per configuration (at most the run's validation_batches)
    validation_rows: int | None = None  # score only the first rows of each validation batch
    phone_book_numbers: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    phone_book_entries: int = 20
    phone_book_examples: int = 20
    finetune_steps: int = 0  # > 0: phone-book lookup also after this many fine-tune steps
    finetune_batch_size: int = 8
    finetune_seq_len: int | None = None  # None: the run's seq_len
    finetune_numbers: tuple[int, ...] = (1, 2, 4, 8)
    finetune_lr: float = 1e-3
    seed: int = 0
    progress: bool = True


def load_tokenizer(client):
    """The run's tokenizer (GET /tokenizer) as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(client.tokenizer()))


def evaluate_run(model: LanguageModel, client, run: str, options: EvaluationOptions | None = None) -> dict:
    """Every evaluation of `model` on `run`: validation loss and accuracy per configuration and
    family, copying and selective-copying accuracy, phone-book digit accuracy (and after the
    fine-tune, on a copy of the model, when options.finetune_steps > 0). A JSON-ready dict."""
    options = options or EvaluationOptions()
    info = client.run(run)
    device = next(model.parameters()).device
    families = {o.name: o.family for o in info.objectives}
    n_batches = min(options.validation_batches, int(info.config.get("validation_batches", 1)))
    started = time.perf_counter()
    batches = fetch_validation_batches(client, run, list(families), n_batches)
    scores = score_batches(model, batches, device, options.validation_rows)
    losses = {name: s.loss for name, s in scores.items()}
    accuracy = {name: s.accuracy for name, s in scores.items()}
    retrieval = {
        family: {name: accuracy[name] for name in accuracy if families[name] == family} for family in RETRIEVAL_FAMILIES
    }
    result: dict = {
        "run": run,
        "validation": {
            "batches_per_configuration": n_batches,
            "rows_per_batch": options.validation_rows,
            "loss": losses,
            "accuracy": accuracy,
            "tokens": {name: s.tokens for name, s in scores.items()},
            "family_loss": family_means(losses, families),
            "family_accuracy": family_means(accuracy, families),
        },
        "copying_accuracy": _mean_or_none(retrieval["copying"].values()),
        "selective_copying_accuracy": _mean_or_none(retrieval["selective_copying"].values()),
        "retrieval_accuracy": retrieval,
    }
    result["seconds_validation"] = time.perf_counter() - started

    if options.phone_book_numbers:
        tokenizer = load_tokenizer(client)
        special = dict(info.special_tokens)
        started = time.perf_counter()
        lookup = dict(numbers=tuple(options.phone_book_numbers), entries=options.phone_book_entries,
                      examples=options.phone_book_examples, seed=options.seed)
        result["phone_book"] = [asdict(r) for r in phone_book_lookup(model, tokenizer, special, **lookup)]
        if options.finetune_steps > 0:
            tuned = copy.deepcopy(model)
            losses_ft = finetune_phone_book(
                tuned, tokenizer, special, steps=options.finetune_steps, batch_size=options.finetune_batch_size,
                seq_len=options.finetune_seq_len or int(info.config["seq_len"]), numbers=options.finetune_numbers,
                entries=options.phone_book_entries, lr=options.finetune_lr, seed=options.seed + 1,
                progress=options.progress,
            )
            result["phone_book_finetuned"] = [asdict(r) for r in phone_book_lookup(tuned, tokenizer, special, **lookup)]
            result["finetune"] = {"steps": options.finetune_steps, "first_loss": losses_ft[0], "last_loss": losses_ft[-1]}
            del tuned
        result["seconds_phone_book"] = time.perf_counter() - started
    return result


def _mean_or_none(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def print_summary(result: dict) -> None:
    """A short table of an `evaluate_run` result."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"validation of run {result['run']} (per family)")
    table.add_column("family")
    table.add_column("loss", justify="right")
    table.add_column("token accuracy", justify="right")
    validation = result["validation"]
    for family, loss in validation["family_loss"].items():
        table.add_row(family, f"{loss:.3f}", f"{validation['family_accuracy'][family]:.1%}")
    console.print(table)
    for key, title in (("phone_book", "phone-book lookup"), ("phone_book_finetuned", "phone-book lookup after fine-tune")):
        if key in result:
            book = Table(title=title)
            book.add_column("numbers", justify="right")
            book.add_column("entries", justify="right")
            book.add_column("digit accuracy", justify="right")
            for row in result[key]:
                book.add_row(str(row["numbers"]), str(row["entries"]), f"{row['digit_accuracy']:.1%}")
            console.print(book)


# ---------------------------------------------------------------------------------------------
# birdie-eval
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    return values


def main(argv: Sequence[str] | None = None) -> None:
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
    @click.option("--server-url", envvar="BIRDIE_SERVER_URL",
                  help="Objective server (default: $BIRDIE_SERVER_URL, else http://127.0.0.1:8000); an API token, "
                       "if it wants one, comes from $BIRDIE_API_TOKEN.")
    @click.option("--run", "run_name", help="Run whose validation batches to use (default: the checkpoint's run).")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
    @click.option("--validation-batches", default=1, show_default=True, help="Validation batches per configuration.")
    @click.option("--validation-rows", type=int, help="Score only the first rows of each validation batch.")
    @click.option("--phone-book-numbers", default="1,2,4,8,16,32", show_default=True,
                  help="Question sizes (numbers asked, 1 to 32), comma-separated; empty: no phone-book lookup.")
    @click.option("--phone-book-entries", default=20, show_default=True, help="Entries per book (at least the numbers asked).")
    @click.option("--phone-book-examples", default=20, show_default=True, help="Books per question size.")
    @click.option("--finetune-steps", default=0, show_default=True,
                  help="Phone-book fine-tune steps before a second lookup (the paper used 1000).")
    @click.option("--finetune-batch-size", default=8, show_default=True, help="Rows per fine-tune batch.")
    @click.option("--finetune-seq-len", type=int, help="Row length of fine-tune batches (default: the run's).")
    @click.option("--finetune-numbers", default="1,2,4,8", show_default=True, help="Question sizes fine-tuned on.")
    @click.option("--finetune-lr", default=1e-3, show_default=True, help="AdamW learning rate of the fine-tune.")
    @click.option("--seed", default=0, show_default=True, help="Chooses the phone books.")
    @click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON here (default: stdout).")
    @click.option("--quiet", is_flag=True, help="No progress bars or tables.")
    def command(checkpoint, server_url, run_name, device, validation_batches, validation_rows, phone_book_numbers, phone_book_entries,
                phone_book_examples, finetune_steps, finetune_batch_size, finetune_seq_len, finetune_numbers,
                finetune_lr, seed, out, quiet):
        """Evaluate a birdie-train CHECKPOINT: validation loss and accuracy per configuration,
        copying / selective-copying accuracy and phone-book lookup digit accuracy."""
        from clients import BirdieClient, BirdieError, NotFoundError
        from trainer.train import load_model, resolve_device

        try:
            options = EvaluationOptions(
                validation_batches=validation_batches, validation_rows=validation_rows, phone_book_numbers=_int_list(phone_book_numbers),
                phone_book_entries=phone_book_entries, phone_book_examples=phone_book_examples,
                finetune_steps=finetune_steps, finetune_batch_size=finetune_batch_size,
                finetune_seq_len=finetune_seq_len, finetune_numbers=_int_list(finetune_numbers),
                finetune_lr=finetune_lr, seed=seed, progress=not quiet,
            )
            model, saved = load_model(checkpoint, resolve_device(device))
            with BirdieClient(server_url) as client:
                result = evaluate_run(model, client, run_name or saved["run"], options)
        except NotFoundError as error:
            hint = "" if run_name else " (the run the checkpoint trained on; --run NAME evaluates on another)"
            raise click.ClickException(f"{error}{hint}") from None
        except (ValueError, BirdieError) as error:
            raise click.ClickException(str(error)) from None
        result["checkpoint"] = {"path": str(checkpoint), "step": saved["step"], "model": saved["model_name"]}
        text = json.dumps(result, indent=2)
        if out:
            with open(out, "w") as f:
                f.write(text + "\n")
        else:
            click.echo(text)
        if not quiet:
            print_summary(result)

    command.main(args=list(argv) if argv is not None else None, prog_name="birdie-eval")


if __name__ == "__main__":
    main()
