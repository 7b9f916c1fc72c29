"""Packing layout: the arrays every trainer receives (birdie-method.md §3)."""

import numpy as np
import pytest

from objective_server.objectives.base import Example
from objective_server.packing import IGNORE_INDEX, Batch, unpack_row, write_example

GEN = 2


def ex(x, y):
    return Example(np.array(x, dtype=np.int32), np.array(y, dtype=np.int32))


def test_golden_layout_two_examples_and_padding():
    batch = Batch.empty(1, 12)
    end = write_example(batch, 0, 0, 1, ex([10, 11, 12], [20, 21]), objective_id=4, generate_id=GEN)
    assert end == 5
    end = write_example(batch, 0, end, 2, ex([30], [40, 41, 42]), objective_id=1, generate_id=GEN)
    assert end == 9
    assert batch.input_ids[0].tolist() == [10, 11, 12, GEN, 20, 30, GEN, 40, 41, 0, 0, 0]
    assert batch.label_ids[0].tolist() == [-100, -100, -100, 20, 21, -100, 40, 41, 42, -100, -100, -100]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 3, 3, 1, 3, 3, 3, 0, 0, 0]
    assert batch.segment_ids[0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]
    assert batch.objective_ids[0].tolist() == [4, 4, 4, 4, 4, 1, 1, 1, 1, -1, -1, -1]
    assert batch.fill_rate == pytest.approx(9 / 12)
    assert batch.n_examples == 2
    for name, arr in batch.arrays().items():
        assert arr.dtype == np.int32 and arr.shape == (1, 12), name


def test_labels_are_inputs_shifted_within_the_suffix():
    batch = Batch.empty(1, 10)
    write_example(batch, 0, 0, 1, ex([5, 6], [7, 8, 9, 10]), 0, GEN)
    inp, lab = batch.input_ids[0], batch.label_ids[0]
    suffix = np.flatnonzero(batch.attention_mask[0] == 3)
    # The token generated at t is the input at t+1 (teacher forcing), except at the last position.
    assert lab[suffix[:-1]].tolist() == inp[suffix[1:]].tolist()
    assert (lab[batch.attention_mask[0] == 1] == IGNORE_INDEX).all()


def test_example_that_does_not_fit_is_refused():
    batch = Batch.empty(1, 4)
    with pytest.raises(ValueError, match="does not fit"):
        write_example(batch, 0, 0, 1, ex([1, 2, 3], [4, 5]), 0, GEN)
    assert batch.equals(Batch.empty(1, 4))  # nothing half-written


def test_unpack_inverts_write():
    batch = Batch.empty(2, 16)
    examples = [ex([9, 8, 7], [6, 5]), ex([4], [3]), ex([1, 1], [2, 2, 2, 2])]
    off = 0
    for seg, e in enumerate(examples, 1):
        off = write_example(batch, 1, off, seg, e, seg, GEN)
    got = unpack_row(batch, 1)
    assert [g.objective_id for g in got] == [1, 2, 3]
    for g, e in zip(got, examples):
        assert g.input.tolist() == e.input.tolist()
        assert g.label.tolist() == e.label.tolist()
    assert unpack_row(batch, 0) == []
