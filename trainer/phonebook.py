"""Synthetic phone books: the multi-number lookup evaluation (birdie-method.md §6).

A prompt asks for some people's numbers, lists the phone book, and asks again (questions, the
book, the questions again: a causal reader learns what to look for before the book, and a
bidirectional prefix sees both); the answer gives the requested entries in question order:

    prefix:  [SELECT] Find the phone numbers of: Ada Park, Omar Lee.
             Phone book:
             Ada Park: 555-201-3348
             ...
             Find the phone numbers of: Ada Park, Omar Lee.
    suffix:  Ada Park: 555-201-3348
             Omar Lee: 555-873-1102 [DONE]

The prompt is read in the bidirectional prefix, the answer is generated in the causal suffix.
The metric is digit accuracy: the digits of the generated answer compared position by position
with the digits of the true one (names hold no digits, so the digit stream is the numbers in
order); a missing digit counts as wrong, chance is about 10 %.

Books are pure functions of (seed, number of questions, book size, index) through the project's
keyed RNG, so every host builds the same evaluation set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from objective_server.objectives.base import Example
from objective_server.packing import Batch, write_example
from objective_server.rng import keyed_rng
from objective_server.special_tokens import DONE, GENERATE

FIRST_NAMES = (
    "Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena", "Milo",
    "Nia", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wes", "Xena", "Yara", "Zed",
    "Alma", "Bo", "Cy", "Dina", "Eli", "Faye", "Gus", "Hana", "Ivo", "Jade", "Kurt", "Lia", "Max",
    "Nell", "Otto", "Paz", "Ray", "Sia", "Tom", "Ugo", "Vera", "Wim", "Yves", "Zoe",
)
LAST_NAMES = (
    "Park", "Lee", "Stone", "Reed", "Cole", "Hart", "Wolf", "Fox", "Lane", "Shaw", "Ward", "West",
    "Hill", "Ford", "Gray", "King", "Moss", "Nash", "Pike", "Rowe", "Sato", "Tran", "Vogt", "Webb",
    "Young", "Bell", "Cruz", "Dunn", "Ellis", "Frey", "Gold", "Holt", "Ito", "Jung", "Kerr", "Long",
    "Mohr", "Noor", "Oakes", "Pratt", "Quist", "Ruiz", "Silva", "Toma", "Usher", "Vance", "Wren",
    "Yoon", "Zhou", "Abe",
)
MAX_NUMBERS = 32
QUESTION = "Find the phone numbers of: {names}."
BOOK_TITLE = "Phone book:"
# Retrieval by a query from a context is what the selective-copying paradigm token announces.
DEFAULT_PARADIGM = "[SELECT]"
_DIGITS = re.compile(r"\d")


@dataclass(frozen=True)
class PhoneBook:
    """Entries (name, number) and the entries asked for, as indices in question order."""

    entries: tuple[tuple[str, str], ...]
    queries: tuple[int, ...]

    @property
    def question(self) -> str:
        return QUESTION.format(names=", ".join(self.entries[i][0] for i in self.queries))

    def prompt(self) -> str:
        """Questions, the book, the questions again."""
        book = "\n".join(f"{name}: {number}" for name, number in self.entries)
        return f"{self.question}\n{BOOK_TITLE}\n{book}\n{self.question}"

    def answer(self) -> str:
        return "\n".join(f"{self.entries[i][0]}: {self.entries[i][1]}" for i in self.queries)


def phone_book(seed: int, n_numbers: int, n_entries: int, index: int) -> PhoneBook:
    """Book `index` of the evaluation set (seed, n_numbers asked, n_entries listed)."""
    return draw_phone_book(keyed_rng(seed, "phone_book", n_numbers, n_entries, index), n_numbers, n_entries)


def draw_phone_book(rng: np.random.Generator, n_numbers: int, n_entries: int) -> PhoneBook:
    """A book of `n_entries` entries and a question for `n_numbers` of them, drawn from `rng`.

    Names and numbers are distinct within a book; the asked entries are distinct and in random
    order.
    """
    if not 1 <= n_numbers <= MAX_NUMBERS:
        raise ValueError(f"a question asks for 1 to {MAX_NUMBERS} numbers, got {n_numbers}")
    if n_entries < n_numbers:
        raise ValueError(f"a book of {n_entries} entries cannot answer {n_numbers} questions")
    if n_entries > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"at most {len(FIRST_NAMES) * len(LAST_NAMES)} distinct names, asked for {n_entries}")
    people = rng.choice(len(FIRST_NAMES) * len(LAST_NAMES), size=n_entries, replace=False)
    # 10^7 distinct seven-digit subscriber numbers behind a fixed exchange prefix style.
    subscribers = rng.choice(10**7, size=n_entries, replace=False)
    areas = rng.integers(200, 1000, size=n_entries)
    entries = tuple(
        (
            f"{FIRST_NAMES[p // len(LAST_NAMES)]} {LAST_NAMES[p % len(LAST_NAMES)]}",
            f"{area:03d}-{s // 10_000:03d}-{s % 10_000:04d}",
        )
        for p, area, s in zip(people.tolist(), areas.tolist(), subscribers.tolist())
    )
    queries = tuple(int(i) for i in rng.choice(n_entries, size=n_numbers, replace=False))
    return PhoneBook(entries, queries)


def digits_of(text: str) -> str:
    return "".join(_DIGITS.findall(text))


def digit_accuracy(generated: str, expected: str) -> float:
    """Share of the expected answer's digits that the generated answer has at the same place in
    its own digit sequence (missing digits are wrong, extra ones are ignored)."""
    want = digits_of(expected)
    if not want:
        raise ValueError(f"the expected answer has no digits: {expected!r}")
    got = digits_of(generated)
    return sum(1 for w, g in zip(want, got) if w == g) / len(want)


def encode_phone_book(book: PhoneBook, tokenizer, special: dict[str, int], paradigm: str = DEFAULT_PARADIGM) -> Example:
    """The book as an objective example: [paradigm] + prompt tokens -> answer tokens + [DONE].

    `tokenizer` is a `tokenizers.Tokenizer` (the run's, from GET /tokenizer); `special` the run's
    special-token ids."""
    for token in (paradigm, DONE):
        if token not in special:
            raise ValueError(f"the tokenizer has no {token} token")
    prompt = tokenizer.encode(book.prompt(), add_special_tokens=False).ids
    answer = tokenizer.encode(book.answer(), add_special_tokens=False).ids
    return Example(
        input=np.asarray([special[paradigm], *prompt], dtype=np.int32),
        label=np.asarray([*answer, special[DONE]], dtype=np.int32),
    )


def finetune_batch(
    tokenizer,
    special: dict[str, int],
    *,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    numbers: tuple[int, ...],
    n_entries: int,
) -> Batch:
    """One packed training batch of phone books (the paper's short phone-book fine-tune), in the
    server's training format. Row r of step s holds books keyed (seed, "finetune", s, r, i), each
    asking for a number of entries drawn from `numbers`; rows are filled until the next book does
    not fit. The keys differ from the evaluation books' keys, so the fine-tune never sees them."""
    if not numbers:
        raise ValueError("numbers must name at least one question size")
    batch = Batch.empty(batch_size, seq_len)
    for row in range(batch_size):
        offset, segment = 0, 1
        while True:
            rng = keyed_rng(seed, "finetune", step, row, segment)
            n_numbers = int(numbers[rng.integers(len(numbers))])
            book = draw_phone_book(rng, n_numbers, max(n_entries, n_numbers))
            example = encode_phone_book(book, tokenizer, special)
            if offset + example.size > seq_len:
                if segment == 1:
                    raise ValueError(
                        f"a phone book asking for {n_numbers} of {max(n_entries, n_numbers)} entries takes "
                        f"{example.size} tokens, more than seq_len = {seq_len}; use fewer entries or numbers"
                    )
                break
            offset = write_example(batch, row, offset, segment, example, 0, special[GENERATE])
            segment += 1
    return batch
