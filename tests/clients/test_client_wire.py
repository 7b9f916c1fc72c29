"""The batch wire format: Arrow and JSON carry identical arrays and headers."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clients.wire import FIELDS, decode_arrow, decode_json, encode_arrow, encode_json

INT32 = st.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max)


@st.composite
def batches(draw):
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 40)))
    fields = {name: draw(arrays(np.int32, shape, elements=INT32)) for name in FIELDS}
    header = {"run": draw(st.text(max_size=10)), "step": draw(st.integers(0, 10**9)), "objectives": ["a", "b"]}
    return fields, header


@settings(max_examples=60, deadline=None)
@given(batches())
def test_arrow_and_json_decode_to_identical_arrays(batch) -> None:
    fields, header = batch
    from_arrow = decode_arrow(encode_arrow(fields, header))
    # Through JSON text, as a client receives it.
    from_json = decode_json(json.loads(json.dumps(encode_json(fields, header))))
    for name in FIELDS:
        assert from_arrow[name].dtype == from_json[name].dtype == np.int32
        np.testing.assert_array_equal(from_arrow[name], fields[name])
        np.testing.assert_array_equal(from_json[name], fields[name])
    assert from_arrow.header == from_json.header == header
    assert from_arrow.shape == from_json.shape == fields["input_ids"].shape


def test_arrow_arrays_are_views_of_the_received_buffer() -> None:
    fields = {name: np.arange(24, dtype=np.int32).reshape(4, 6) + i for i, name in enumerate(FIELDS)}
    payload = encode_arrow(fields, {"step": 1})
    batch = decode_arrow(payload)
    start = np.frombuffer(payload, dtype=np.uint8).ctypes.data
    for name in FIELDS:
        view = batch[name]
        assert not view.flags.owndata and not view.flags.writeable
        assert start <= view.ctypes.data < start + len(payload)  # no copy was made


def test_json_examples_are_not_taken_for_header_fields() -> None:
    fields = {name: np.zeros((1, 3), dtype=np.int32) for name in FIELDS}
    body = encode_json(fields, {"step": 2}, examples=[{"row": 0, "input": "x"}])
    assert decode_json(body).header == {"step": 2}
