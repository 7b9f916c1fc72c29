"""Evaluations: the phone-book generator's format and digit accuracy on known strings, the
fine-tune batches, greedy decoding, teacher-forced scores on constructed batches, and the whole
evaluation (and `birdie-eval`) against a live objective server."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clients.wire import WireBatch
from objective_server.packing import IGNORE_INDEX, PREFIX, SUFFIX, unpack_row
from trainer import phonebook
from trainer.evaluate import (
    EvaluationOptions,
    evaluate_run,
    finetune_phone_book,
    greedy_decode,
    load_tokenizer,
    main as eval_main,
    phone_book_lookup,
    score_batches,
)
from trainer.models import build_model
from trainer.models.common import PREFIX as MODEL_PREFIX, SUFFIX as MODEL_SUFFIX
from trainer.train import TrainConfig, load_checkpoint, train

NUMBER = re.compile(r"^\d{3}-\d{3}-\d{4}$")


@pytest.fixture(scope="module")
def run_name(client):
    arms = [
        {"objective": "copying.len8", "probability": 1.0},
        {"objective": "copying.len32", "probability": 1.0},
        {"objective": "selective_copying.spans1.after.span4to8.len48", "probability": 1.0},
        {"objective": "next_token.len127", "probability": 1.0},
    ]
    client.create_run({"name": "evals", "arms": arms, "seq_len": 128, "batch_size": 4, "total_steps": 4,
                       "eval_steps": [4], "policy": {"name": "fixed"}})
    return "evals"


@pytest.fixture(scope="module")
def tokenizer(client):
    return load_tokenizer(client)


@pytest.fixture(scope="module")
def special(client, run_name):
    return dict(client.run(run_name).special_tokens)


def tiny_hawk(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("hawk", vocab_size=vocab_size, d_model=32, n_layers=2, bidirectional=True)


# --- phone books ---------------------------------------------------------------------------------


def test_phone_book_prompt_is_questions_book_questions():
    book = phonebook.phone_book(seed=0, n_numbers=3, n_entries=8, index=0)
    lines = book.prompt().split("\n")
    asked = [book.entries[i][0] for i in book.queries]
    question = f"Find the phone numbers of: {', '.join(asked)}."
    assert lines[0] == question and lines[-1] == question
    assert lines[1] == "Phone book:"
    assert lines[2:-1] == [f"{name}: {number}" for name, number in book.entries]
    assert book.answer().split("\n") == [f"{book.entries[i][0]}: {book.entries[i][1]}" for i in book.queries]
    names = [name for name, _ in book.entries]
    numbers = [number for _, number in book.entries]
    assert len(set(names)) == 8 and len(set(numbers)) == 8
    assert all(NUMBER.match(n) for n in numbers)
    assert len(set(book.queries)) == 3


def test_phone_books_are_keyed():
    assert phonebook.phone_book(1, 4, 10, 5) == phonebook.phone_book(1, 4, 10, 5)
    assert phonebook.phone_book(1, 4, 10, 5) != phonebook.phone_book(1, 4, 10, 6)
    assert phonebook.phone_book(1, 4, 10, 5) != phonebook.phone_book(2, 4, 10, 5)
    big = phonebook.phone_book(0, 32, 40, 0)
    assert len(big.queries) == 32 and len(big.entries) == 40


@pytest.mark.parametrize("numbers, entries, message", [(0, 5, "1 to 32"), (33, 40, "1 to 32"), (5, 4, "cannot answer")])
def test_phone_book_sizes_are_checked(numbers, entries, message):
    with pytest.raises(ValueError, match=message):
        phonebook.phone_book(0, numbers, entries, 0)


def test_digit_accuracy_on_known_strings():
    expected = "Ada Park: 555-201-3348\nOmar Lee: 555-873-1102"
    assert phonebook.digit_accuracy(expected, expected) == 1.0
    # The digits are compared in order; names and separators do not matter.
    assert phonebook.digit_accuracy("5552013348 5558731102", expected) == 1.0
    assert phonebook.digit_accuracy("Ada Park: 555-201-3349\nOmar Lee: 555-873-1102", expected) == 0.95
    assert phonebook.digit_accuracy("Ada Park: 555-201-3348", expected) == 0.5  # the second number is missing
    assert phonebook.digit_accuracy("Ada Park: 555-201-3348\nOmar Lee: 555-873-1102 999", expected) == 1.0
    assert phonebook.digit_accuracy("no idea", expected) == 0.0
    assert phonebook.digit_accuracy("000-000-0000", "Ada Park: 123-456-7890") == 0.1  # one 0 in the right place
    with pytest.raises(ValueError, match="no digits"):
        phonebook.digit_accuracy("1", "nothing")


def test_encoded_phone_book_reads_back(tokenizer, special):
    book = phonebook.phone_book(0, 2, 5, 3)
    example = phonebook.encode_phone_book(book, tokenizer, special)
    assert example.input[0] == special["[SELECT]"] and example.label[-1] == special["[DONE]"]
    assert tokenizer.decode(example.input[1:].tolist()) == book.prompt()
    assert tokenizer.decode(example.label[:-1].tolist()) == book.answer()


def test_finetune_batches_are_packed_phone_books(tokenizer, special):
    kwargs = dict(seed=0, step=2, batch_size=3, seq_len=256, numbers=(1, 2), n_entries=4)
    batch = phonebook.finetune_batch(tokenizer, special, **kwargs)
    assert batch.shape == (3, 256)
    again = phonebook.finetune_batch(tokenizer, special, **kwargs)
    assert batch.equals(again)
    for row in range(3):
        examples = unpack_row(batch, row)
        assert len(examples) >= 1
        for example in examples:
            assert example.input[0] == special["[SELECT]"] and example.label[-1] == special["[DONE]"]
            assert "Phone book:" in tokenizer.decode(example.input[1:].tolist())
            n = len(example.input)
            start = example.offset
            assert batch.input_ids[row, start + n] == special["[GEN]"]
            assert (batch.label_ids[row, start : start + n] == IGNORE_INDEX).all()
            assert (batch.attention_mask[row, start : start + n] == PREFIX).all()
            assert batch.attention_mask[row, start + n] == SUFFIX
    padding = batch.attention_mask == 0
    assert padding.any() and (batch.input_ids[padding] == 0).all()  # as the server pads (method §3)
    other = phonebook.finetune_batch(tokenizer, special, **{**kwargs, "step": 3})
    assert not batch.equals(other)
    with pytest.raises(ValueError, match="more than seq_len = 64"):
        phonebook.finetune_batch(tokenizer, special, **{**kwargs, "seq_len": 64})


# --- decoding and scores -------------------------------------------------------------------------


def test_recurrent_greedy_decoding_matches_rerunning_the_forward_pass():
    model = tiny_hawk(vocab_size=50)
    prefix = [5, 9, 11, 3, 7, 22, 8]
    decoded = greedy_decode(model, prefix, generate_id=2, max_new_tokens=12)
    sequence = [*prefix, 2]
    expected = []
    with torch.no_grad():
        for _ in range(12):
            ids = torch.tensor([sequence])
            mask = torch.full_like(ids, MODEL_SUFFIX)
            mask[:, : len(prefix)] = MODEL_PREFIX
            token = int(model(ids, mask)[0, -1].argmax())
            expected.append(token)
            sequence.append(token)
    assert decoded == expected
    # A stop token ends the answer and is kept.
    stopped = greedy_decode(model, prefix, generate_id=2, max_new_tokens=12, stop_ids=[expected[3]])
    assert stopped == expected[: expected.index(expected[3]) + 1]


def test_transformer_decodes_by_rerunning_the_forward_pass():
    torch.manual_seed(0)
    model = build_model("transformer", vocab_size=40, d_model=32, n_layers=2, n_heads=2, bidirectional=True)
    with torch.no_grad():  # large random weights: at init (tied embeddings) it would echo its last input token
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.3)
    prefix = [4, 5, 6, 9, 1]
    out = greedy_decode(model, prefix, generate_id=2, max_new_tokens=6)
    assert len(out) == 6 and len(set(out)) > 2
    # Teacher-forced on its own answer, one forward pass predicts every answer token: the suffix is
    # causal, so position t sees exactly what the decoder saw when it chose token t.
    ids = torch.tensor([[*prefix, 2, *out[:-1]]])
    mask = torch.full_like(ids, MODEL_SUFFIX)
    mask[:, : len(prefix)] = MODEL_PREFIX
    with torch.no_grad():
        assert model(ids, mask)[0, len(prefix):].argmax(-1).tolist() == out
    assert greedy_decode(model, prefix, generate_id=2, max_new_tokens=6, stop_ids=[out[1]]) == out[: out.index(out[1]) + 1]


class OracleLM(nn.Module):
    """Logits 5.0 on one token and 0 elsewhere: the label for objective 0 (right), the label + 1
    for objective 1 (wrong)."""

    def __init__(self, label_ids: torch.Tensor, objective_ids: torch.Tensor, vocab: int = 10):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # so the model has a device
        target = torch.where(objective_ids == 1, (label_ids + 1) % vocab, label_ids).clamp_min(0)
        self.logits = 5.0 * nn.functional.one_hot(target, vocab).float()

    def forward(self, input_ids, attention_mask=None, segment_ids=None, position_ids=None):
        return self.logits[: input_ids.shape[0]]


def test_scores_per_configuration_on_a_constructed_batch():
    label = np.array([[-100, -100, 3, 4, 5, -100, 6, 7], [-100, 1, 2, -100, -100, -100, 8, 9]], dtype=np.int32)
    objective = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]], dtype=np.int32)
    arrays = {
        "input_ids": np.zeros_like(label), "label_ids": label, "attention_mask": np.where(label == -100, 1, 3),
        "segment_ids": np.ones_like(label), "position_ids": np.tile(np.arange(8), (2, 1)), "objective_ids": objective,
    }
    batch = WireBatch(arrays={k: v.astype(np.int32) for k, v in arrays.items()}, header={"objectives": ["right", "wrong"]})
    model = OracleLM(torch.from_numpy(label).long(), torch.from_numpy(objective).long())
    scores = score_batches(model, [batch], "cpu")
    right_loss = -math.log(math.exp(5) / (math.exp(5) + 9))
    wrong_loss = -math.log(1 / (math.exp(5) + 9))
    assert scores["right"].tokens == 5 and scores["wrong"].tokens == 4
    assert scores["right"].accuracy == 1.0 and scores["wrong"].accuracy == 0.0
    assert scores["right"].loss == pytest.approx(right_loss) and scores["wrong"].loss == pytest.approx(wrong_loss)
    # Only the first row: objective 0 has 3 labelled tokens there, objective 1 has 2.
    first_row = score_batches(model, [batch], "cpu", rows=1)
    assert first_row["right"].tokens == 3 and first_row["wrong"].tokens == 2


# --- against the live server ---------------------------------------------------------------------


def test_phone_book_lookup_and_finetune(tokenizer, special):
    model = tiny_hawk(vocab_size=tokenizer.get_vocab_size())
    results = phone_book_lookup(model, tokenizer, special, numbers=(1, 2), entries=3, examples=2)
    assert [r.numbers for r in results] == [1, 2] and [r.entries for r in results] == [3, 3]
    assert all(0.0 <= r.digit_accuracy <= 1.0 and r.examples == 2 for r in results)
    assert results[0].sample_answer == phonebook.phone_book(0, 1, 3, 0).answer()
    losses = finetune_phone_book(model, tokenizer, special, steps=12, batch_size=2, seq_len=192, numbers=(1,),
                                 entries=2, lr=3e-3)
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0


def test_evaluate_run_reports_every_evaluation(client, run_name, tokenizer):
    model = tiny_hawk(vocab_size=tokenizer.get_vocab_size())
    options = EvaluationOptions(phone_book_numbers=(1,), phone_book_entries=2, phone_book_examples=1,
                                finetune_steps=2, finetune_batch_size=2, finetune_numbers=(1,), progress=False)
    before = [p.detach().clone() for p in model.parameters()]
    result = evaluate_run(model, client, run_name, options)
    names = ["copying.len8", "copying.len32", "selective_copying.spans1.after.span4to8.len48", "next_token.len127"]
    validation = result["validation"]
    assert set(validation["loss"]) == set(names) and all(validation["tokens"][n] > 0 for n in names)
    assert set(validation["family_loss"]) == {"copying", "selective_copying", "next_token"}
    copying = [validation["accuracy"]["copying.len8"], validation["accuracy"]["copying.len32"]]
    assert result["copying_accuracy"] == pytest.approx(sum(copying) / 2)
    assert result["selective_copying_accuracy"] == validation["accuracy"][names[2]]
    assert len(result["phone_book"]) == 1 and len(result["phone_book_finetuned"]) == 1
    assert result["finetune"]["steps"] == 2
    # The fine-tune trains a copy: the evaluated model is unchanged.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    json.dumps(result)  # JSON-ready


def test_birdie_eval_cli_on_a_checkpoint(server, run_name, tmp_path, capsys):
    config = TrainConfig(model="hawk", d_model=32, n_layers=2, server_url=server.url, run_name=run_name, threads=1,
                         progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    train(config)
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path / "ckpt" / "step_00000004.pt"), "--server-url", server.url, "--phone-book-numbers", "1",
                   "--phone-book-entries", "2", "--phone-book-examples", "1", "--out", str(out), "--quiet"])
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    assert result["run"] == run_name and result["checkpoint"]["step"] == 4 and result["checkpoint"]["model"] == "hawk"
    assert 0.0 <= result["copying_accuracy"] <= 1.0
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path / "ckpt" / "step_00000004.pt"), "--server-url", server.url, "--run", "no-such-run", "--quiet"])
    assert exit_info.value.code == 1
    assert "no-such-run" in capsys.readouterr().err
    # A checkpoint whose run the server does not know: the error says how to name another run.
    saved = torch.load(tmp_path / "ckpt" / "step_00000004.pt", weights_only=False)
    torch.save({**saved, "run": "gone"}, tmp_path / "gone.pt")
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path / "gone.pt"), "--server-url", server.url, "--quiet"])
    assert exit_info.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "'gone'" in line and line.endswith("(the run the checkpoint trained on; --run NAME evaluates on another)")


def test_birdie_eval_help_names_the_servers_url_and_token_variables(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # click wraps lines
    assert ("--server-url TEXT Objective server (default: $BIRDIE_SERVER_URL, else http://127.0.0.1:8000); an API "
            "token, if it wants one, comes from $BIRDIE_API_TOKEN.") in text


def test_birdie_eval_on_a_file_that_is_not_a_checkpoint_is_one_clear_line(not_checkpoints, capsys):
    for path in not_checkpoints.values():
        with pytest.raises(SystemExit) as exit_info:
            eval_main([str(path), "--device", "cpu", "--quiet"])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith(f"Error: {path} is not a birdie-train checkpoint: ") and err.count("\n") == 1
        assert "weights_only" not in err


def test_birdie_eval_on_an_unknown_device_is_one_clear_line(not_checkpoints, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(not_checkpoints["text"]), "--device", "gpu", "--quiet"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "Error: device must be auto, cpu, cuda or cuda:N, got 'gpu'\n"


def test_readme_birdie_eval_example_works_on_a_fresh_server(server, run_name, tmp_path):
    """The README's example evaluates the checkpoint of `make run`'s `demo` run, which a fresh server
    (here: the module's, with the preset runs) never heard of."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (example,) = [line for line in readme.splitlines() if line.startswith(".venv/bin/birdie-eval ")]
    args = shlex.split(example)[1:]
    train(TrainConfig(model="hawk", d_model=32, n_layers=2, server_url=server.url, run_name=run_name, threads=1,
                      progress=False, checkpoint_dir=str(tmp_path), stop_step=1))
    state = load_checkpoint(tmp_path / "step_00000001.pt")
    state["run"] = "demo"
    checkpoint = tmp_path / args[0].split("/")[-1]
    torch.save(state, checkpoint)
    args[0] = str(checkpoint)
    args[args.index("--server-url") + 1] = server.url
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        eval_main([*args, "--validation-rows", "1", "--phone-book-numbers", "", "--out", str(out), "--quiet"])
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"]["path"] == str(checkpoint) and len(result["validation"]["loss"]) > 1
    assert all(math.isfinite(loss) for loss in result["validation"]["loss"].values())
