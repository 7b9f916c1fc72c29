"""Batch generation is a pure function of its address."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objective_server.batching import generate_batch, row_windows, validation_batch, window_permutation
from objective_server.objectives import parse_objective
from objective_server.objectives.presets import preset
from objective_server.special_tokens import SpecialTokens

SPECIAL = SpecialTokens.default()
FIRST_TEXT_ID = 1000
# A corpus whose every token is distinct, so the tokens of a batch say which corpus positions it read.
CORPUS = np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + 64 * 256, dtype=np.uint32)


def ntp_batch(step, rank=0, world_size=1, batch_size=4, seq_len=256, seed=0, tokens=CORPUS):
    ntp = parse_objective({"family": "next_token", "length": seq_len})
    return generate_batch([ntp], [1.0], tokens, SPECIAL, seed=seed, batch_size=batch_size,
                          seq_len=seq_len, rank=rank, world_size=world_size, step=step)


def text_tokens(batch):
    labels = batch.label_ids[batch.label_ids >= FIRST_TEXT_ID]
    return set(labels.tolist())


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4099])
def test_window_permutation_is_a_bijection(n):
    out = window_permutation(np.arange(n), n, key=12345)
    assert sorted(out.tolist()) == list(range(n))
    other = window_permutation(np.arange(n), n, key=999)
    if n > 16:
        assert not np.array_equal(out, other)  # the key matters


def test_same_address_gives_identical_batch_and_other_addresses_differ():
    arms = preset("birdie", seq_len=512)
    objectives, probs = [o for o, _ in arms], [p for _, p in arms]
    kw = dict(seed=7, batch_size=4, seq_len=512, world_size=2)
    a = generate_batch(objectives, probs, CORPUS, SPECIAL, rank=1, step=3, **kw)
    b = generate_batch(objectives, probs, CORPUS, SPECIAL, rank=1, step=3, **kw)
    assert a.equals(b)
    assert not a.equals(generate_batch(objectives, probs, CORPUS, SPECIAL, rank=0, step=3, **kw))
    assert not a.equals(generate_batch(objectives, probs, CORPUS, SPECIAL, rank=1, step=4, **kw))


def test_identical_across_processes():
    code = (
        "import hashlib, numpy as np;"
        "from tests.test_batching import *;"
        "from objective_server.objectives.presets import preset;"
        "arms = preset('birdie', seq_len=512);"
        "b = generate_batch([o for o,_ in arms], [p for _,p in arms], CORPUS, SPECIAL, seed=3,"
        " batch_size=4, seq_len=512, rank=0, world_size=1, step=11);"
        "print(hashlib.sha256(b''.join(a.tobytes() for a in b.arrays().values())).hexdigest())"
    )
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(2)}
    arms = preset("birdie", seq_len=512)
    b = generate_batch([o for o, _ in arms], [p for _, p in arms], CORPUS, SPECIAL, seed=3,
                       batch_size=4, seq_len=512, rank=0, world_size=1, step=11)
    import hashlib
    here = hashlib.sha256(b"".join(a.tobytes() for a in b.arrays().values())).hexdigest()
    assert digests == {here + "\n"}


def test_ranks_read_disjoint_corpus_tokens():
    world = 4
    seen = [text_tokens(ntp_batch(step=2, rank=r, world_size=world)) for r in range(world)]
    for i in range(world):
        assert seen[i]
        for j in range(i + 1, world):
            assert not seen[i] & seen[j]


def test_an_epoch_covers_the_corpus_about_once():
    # 64 windows of 256 tokens; 16 steps x 4 rows = one epoch. NTP reads all but one token per row
    # plus the examples' paradigm and GEN positions, so nearly every corpus token appears once.
    seen = []
    for step in range(16):
        b = ntp_batch(step=step)
        seen.extend(b.label_ids[b.label_ids >= FIRST_TEXT_ID].tolist())
    counts = np.bincount(np.asarray(seen) - FIRST_TEXT_ID, minlength=len(CORPUS))
    assert counts.max() == 1  # nothing read twice within the epoch
    assert (counts == 1).mean() > 0.98  # and almost everything read once


def test_next_epoch_uses_another_order():
    first = [sorted(text_tokens(ntp_batch(step=s)))[:1] for s in range(16)]
    second = [sorted(text_tokens(ntp_batch(step=16 + s)))[:1] for s in range(16)]
    assert first != second


def test_validation_batches_are_fixed_single_objective_and_in_training_format():
    arms = preset("birdie", seq_len=512)
    names = [o.name for o, _ in arms]
    held_out = np.arange(50_000, 50_000 + 3000, dtype=np.uint32)
    for k, (obj, _) in enumerate(arms[:6]):
        a = validation_batch(obj, k, held_out, SPECIAL, seed=1, batch_size=2, seq_len=512, index=0)
        assert a.equals(validation_batch(obj, k, held_out, SPECIAL, seed=1, batch_size=2, seq_len=512, index=0))
        assert not a.equals(validation_batch(obj, k, held_out, SPECIAL, seed=1, batch_size=2, seq_len=512, index=1))
        used = a.objective_ids[a.segment_ids > 0]
        assert set(used.tolist()) == {k}, names[k]
        assert ((a.attention_mask == 3) == (a.label_ids != -100)).all()
        assert (a.input_ids[a.segment_ids > 0] != SPECIAL.pad).all()


def test_padding_input_is_id_0_even_when_the_tokenizer_puts_pad_elsewhere():
    # A loaded tokenizer gets the special tokens appended: [PAD] is not id 0 there.
    special = SpecialTokens.from_mapping({token: 500 + i for token, i in SPECIAL.ids.items()})
    copying = parse_objective("copying.len64")  # 1 + 64 + 64 positions: a row of 130 keeps 1 of padding
    batches = [
        generate_batch([copying], [1.0], CORPUS, special, seed=0, batch_size=2, seq_len=130, rank=0,
                       world_size=1, step=0),
        validation_batch(copying, 0, CORPUS, special, seed=0, batch_size=2, seq_len=130, index=0),
    ]
    for b in batches:
        padding = b.segment_ids == 0
        assert padding[:, -1].all()
        assert (b.input_ids[padding] == 0).all() and (b.label_ids[padding] == -100).all()


@settings(max_examples=25, deadline=None)
@given(step=st.integers(0, 10_000), rank=st.integers(0, 7), seq_len=st.sampled_from([128, 200, 256, 1000]),
       extra_tokens=st.integers(0, 5000), seed=st.integers(0, 2**32))
def test_any_address_and_corpus_size_packs_valid_rows(step, rank, seq_len, extra_tokens, seed):
    arms = preset("birdie", seq_len=seq_len)
    tokens = np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + seq_len + extra_tokens, dtype=np.uint32)
    b = generate_batch([o for o, _ in arms], [p for _, p in arms], tokens, SPECIAL, seed=seed, batch_size=2,
                       seq_len=seq_len, rank=rank, world_size=8, step=step)
    assert b.shape == (2, seq_len)
    seg = b.segment_ids
    # Segments are 1, 2, 3, ... from the left, padding only on the right.
    for row in seg:
        used = row[row > 0]
        assert (np.diff(used) >= 0).all() and (np.diff(used) <= 1).all()
        if used.size:
            assert used[0] == 1 and (row[: used.size] > 0).all()
    # Labels exist exactly on suffix positions.
    assert ((b.attention_mask == 3) == (b.label_ids != -100)).all()
    # Every example's tokens carry one configuration of the run; padding carries none (-1).
    objective = b.objective_ids
    assert ((objective >= 0) == (seg > 0)).all() and objective.max() < len(arms)
    for row_seg, row_objective in zip(seg, objective):
        for segment in np.unique(row_seg[row_seg > 0]):
            assert len(np.unique(row_objective[row_seg == segment])) == 1
    assert b.fill_rate > 0.5


def test_a_split_shorter_than_a_row_is_refused_not_repeated():
    ntp = parse_objective({"family": "next_token", "length": 256})
    short = CORPUS[:255]
    with pytest.raises(ValueError, match="the train split holds 255 tokens, fewer than seq_len = 256"):
        ntp_batch(step=0, tokens=short)
    with pytest.raises(ValueError, match="the validation split holds 255 tokens, fewer than seq_len = 256"):
        validation_batch(ntp, 0, short, SPECIAL, seed=0, batch_size=2, seq_len=256, index=0)
    # One row's worth is enough: every row reads each corpus token at most once.
    exact = CORPUS[:256]
    for b in (ntp_batch(step=5, tokens=exact),
              validation_batch(ntp, 0, exact, SPECIAL, seed=0, batch_size=4, seq_len=256, index=3)):
        for labels in b.label_ids:
            text = labels[labels >= FIRST_TEXT_ID]
            assert len(text) > 200 and len(np.unique(text)) == len(text)


def test_row_windows_cover_each_epoch_once_and_move_between_epochs():
    n_tokens, seq_len = 64 * 256 + 100, 256  # 64 windows and a remainder the shift moves into play
    starts = row_windows(np.arange(3 * 64), n_tokens, seq_len, seed=0, split="train")
    epochs = starts.reshape(3, 64)
    for epoch in epochs:  # an epoch's 64 windows are disjoint stretches of the corpus
        covered = (epoch[:, None] + np.arange(seq_len)) % n_tokens
        assert len(np.unique(covered)) == 64 * seq_len
    assert len({int(epoch[0] % seq_len) for epoch in epochs}) > 1  # the window grid shifts per epoch
    assert not np.array_equal(epochs[0] // seq_len, epochs[1] // seq_len)  # and the order is drawn again


def test_bad_addresses_are_refused():
    with pytest.raises(ValueError, match="rank"):
        ntp_batch(step=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="step"):
        ntp_batch(step=-1)
    ntp = parse_objective({"family": "next_token", "length": 64})
    with pytest.raises(ValueError, match="probabilities"):
        generate_batch([ntp], [float("nan")], CORPUS, SPECIAL, seed=0, batch_size=1, seq_len=64,
                       rank=0, world_size=1, step=0)


# sha256 (first 16 hex digits) of the batches `pinned_batches` makes, per generator revision: any
# change to what a batch holds at an address must bump GENERATOR_REVISION (runs record it, and a
# server of another revision refuses them rather than serve other bytes) and pin the new bytes here.
PINNED = {
    2: {"birdie": "0f6c41b9cd2fbe0e", "ul2": "6485a934f6ed0644", "decoder-ul2": "11a43126214c8474",
        "ntp": "2fb1a88db583a949", "validation": "5e2ebfa86d569d8f", "birdie-short": "005a4be1f70afb99"},
}


def pinned_batches(name: str):
    corpus = ((np.arange(64 * 512, dtype=np.uint64) * 7919) % 4099 + FIRST_TEXT_ID).astype(np.uint32)
    # short rows (many short examples and padding), special ids not at 0 (a loaded tokenizer's)
    seq_len, special = (128, SpecialTokens.from_mapping({t: 500 + i for t, i in SPECIAL.ids.items()})) \
        if name == "birdie-short" else (512, SPECIAL)
    arms = preset("birdie" if name in ("validation", "birdie-short") else name, seq_len=seq_len)
    objectives, probs = [o for o, _ in arms], [p for _, p in arms]
    if name == "validation":
        return [validation_batch(objectives[i], i, corpus, special, seed=7, batch_size=4, seq_len=seq_len, index=1)
                for i in range(0, len(objectives), 5)]
    return [generate_batch(objectives, probs, corpus, special, seed=7, batch_size=4, seq_len=seq_len, rank=1,
                           world_size=2, step=step) for step in range(4)]


@pytest.mark.parametrize("name", ["birdie", "birdie-short", "ul2", "decoder-ul2", "ntp", "validation"])
def test_batch_bytes_are_pinned_to_the_generator_revision(name):
    import hashlib

    from objective_server.batching import GENERATOR_REVISION

    digest = hashlib.sha256()
    for batch in pinned_batches(name):
        for array in batch.arrays().values():
            digest.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
    assert digest.hexdigest()[:16] == PINNED[GENERATOR_REVISION][name], (
        "the bytes of a batch changed: bump GENERATOR_REVISION in objective_server/batching.py and pin the new "
        f"hashes ({name}: {digest.hexdigest()[:16]})"
    )
