"""The batch wire format: an Arrow IPC stream (the default) or JSON.

Arrow: one record batch of B rows; each field (input_ids, label_ids, attention_mask, segment_ids,
position_ids, objective_ids) is a FixedSizeList<int32>[seq_len] column, so a field reads back as a
zero-copy (B, L) numpy view. The schema metadata key `birdie` holds the batch header as JSON: run,
split, step, rank, world_size, mixture_version, objective names (index = objective id), fill rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

FIELDS = ("input_ids", "label_ids", "attention_mask", "segment_ids", "position_ids", "objective_ids")
ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
JSON_MEDIA_TYPE = "application/json"
HEADER_KEY = b"birdie"


@dataclass
class WireBatch:
    """A batch as a client sees it: the six (B, L) int32 arrays and the header."""

    arrays: dict[str, np.ndarray]
    header: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def objectives(self) -> list[str]:
        return list(self.header.get("objectives", []))

    @property
    def shape(self) -> tuple[int, int]:
        return self.arrays["input_ids"].shape


def encode_arrow(arrays: dict[str, np.ndarray], header: dict[str, Any]) -> bytes:
    columns = []
    for name in FIELDS:
        a = np.ascontiguousarray(arrays[name], dtype=np.int32)
        b, length = a.shape
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=pa.int32()), length))
    schema = pa.schema(
        [pa.field(n, c.type, nullable=False) for n, c in zip(FIELDS, columns)],
        metadata={HEADER_KEY: json.dumps(header, sort_keys=True).encode()},
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch(columns, schema=schema))
    return sink.getvalue().to_pybytes()


def decode_arrow(payload: bytes) -> WireBatch:
    reader = pa.ipc.open_stream(pa.py_buffer(payload))
    table = reader.read_all()
    header = json.loads((reader.schema.metadata or {}).get(HEADER_KEY, b"{}"))
    arrays = {}
    for name in FIELDS:
        chunks = table.column(name)
        # combine_chunks() copies even a single chunk; a stream of one record batch needs no copy.
        column = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
        length = column.type.list_size
        arrays[name] = column.flatten().to_numpy(zero_copy_only=True).reshape(-1, length)
    return WireBatch(arrays=arrays, header=header)


def encode_json(arrays: dict[str, np.ndarray], header: dict[str, Any], examples: list[dict] | None = None) -> dict:
    body = dict(header)
    body["arrays"] = {name: np.asarray(arrays[name]).tolist() for name in FIELDS}
    if examples is not None:
        body["examples"] = examples
    return body


def decode_json(body: dict) -> WireBatch:
    body = dict(body)
    arrays = {name: np.asarray(v, dtype=np.int32) for name, v in body.pop("arrays").items()}
    body.pop("examples", None)
    return WireBatch(arrays=arrays, header=body)
