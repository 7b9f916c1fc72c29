"""BirdieIterableDataset: tensors without copies, the rank from torch.distributed, DataLoader workers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from clients.torch_data import BirdieIterableDataset, as_tensor
from clients.wire import FIELDS, decode_arrow, encode_arrow
from fake_birdie_server import RUN, FakeBirdieServer, batch_arrays

FAST = {"timeout": 2.0, "retries": 3, "backoff": 0.01, "max_delay": 0.05}


def test_yields_dicts_of_tensors_in_step_order(server: FakeBirdieServer) -> None:
    dataset = BirdieIterableDataset(server.url, RUN, start_step=3, end_step=7, rank=1, world_size=2, **FAST)
    items = list(dataset)
    assert [int(item["step"]) for item in items] == [3, 4, 5, 6]
    for item in items:
        assert set(item) == {*FIELDS, "step"}
        expected = batch_arrays(int(item["step"]), 1, 2, "train", 0, server.shape)
        for name in FIELDS:
            assert item[name].dtype == torch.int32 and tuple(item[name].shape) == server.shape
            np.testing.assert_array_equal(item[name].numpy(), expected[name])
    assert {s.params["rank"] for s in server.requests("/batch")} == {"1"}


def test_tensors_share_memory_with_the_decoded_arrays() -> None:
    fields = {name: np.full((2, 5), i, dtype=np.int32) for i, name in enumerate(FIELDS)}
    batch = decode_arrow(encode_arrow(fields, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the read-only warning is expected and silenced
        tensor = as_tensor(batch["label_ids"])
    assert tensor.data_ptr() == batch["label_ids"].ctypes.data
    writable = np.arange(6, dtype=np.int32)
    assert as_tensor(writable).data_ptr() == writable.ctypes.data


def test_rank_and_world_size_come_from_torch_distributed(server: FakeBirdieServer) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=4)
    try:
        dataset = BirdieIterableDataset(server.url, RUN, end_step=2, **FAST)
        explicit = BirdieIterableDataset(server.url, RUN, end_step=1, rank=0, world_size=2, **FAST)
    finally:
        dist.destroy_process_group()
    assert (dataset.rank, dataset.world_size) == (3, 4)
    assert [int(item["step"]) for item in dataset] == [0, 1]
    assert {(s.params["rank"], s.params["world_size"]) for s in server.requests("/batch")} == {("3", "4")}
    assert (explicit.rank, explicit.world_size) == (0, 2)
    with pytest.raises(ValueError, match="both"):
        BirdieIterableDataset(server.url, RUN, rank=1)
    with pytest.raises(TypeError):
        BirdieIterableDataset(server.url, RUN, retires=3)


def test_dataloader_workers_split_steps_and_keep_the_order(server: FakeBirdieServer) -> None:
    dataset = BirdieIterableDataset(server.url, RUN, start_step=10, end_step=17, prefetch=2, **FAST)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    items = list(loader)
    assert [int(item["step"]) for item in items] == list(range(10, 17))
    requested = sorted(int(s.params["step"]) for s in server.requests("/batch"))
    assert requested == list(range(10, 17))  # each step fetched once across both workers
    np.testing.assert_array_equal(items[4]["input_ids"].numpy(), batch_arrays(14, 0, 1, "train", 0, server.shape)["input_ids"])


def test_more_workers_than_steps(server: FakeBirdieServer) -> None:
    dataset = BirdieIterableDataset(server.url, RUN, start_step=0, end_step=1, **FAST)
    assert [int(item["step"]) for item in DataLoader(dataset, batch_size=None, num_workers=2)] == [0]
