"""A torch IterableDataset over one run's training batches (needs torch; the rest of `clients` does not).

    dataset = BirdieIterableDataset(None, "my-run", start_step=resume_step)   # URL from $BIRDIE_SERVER_URL
    for batch in DataLoader(dataset, batch_size=None, num_workers=2, pin_memory=True):
        batch["input_ids"]            # (B, L) int32 tensor; also label_ids, attention_mask, segment_ids,
        int(batch["step"])            # position_ids, objective_ids, and the step as a 0-d tensor

Each item is already a whole batch: use `batch_size=None` in the DataLoader. The rank and world size
come from torch.distributed when it is initialised (each rank then asks for its own batches). With
DataLoader workers, worker w of n takes steps start_step + w, start_step + w + n, ...; the DataLoader
reads its workers in turn, so steps still arrive in order.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from clients.client import BirdieClient
from clients.iterator import BatchIterator, check_step_range
from clients.wire import FIELDS, WireBatch


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory. Arrays decoded from Arrow are read-only views of the
    received buffer, which nothing else holds; torch has no read-only tensors, so it warns about
    that. The tensors are for reading (feeding the model, copying to the device): clone before
    writing in place."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def batch_tensors(step: int, batch: WireBatch) -> dict[str, torch.Tensor]:
    """The six (B, L) fields as tensors (zero-copy) and the step as a 0-d int64 tensor."""
    tensors = {name: as_tensor(batch[name]) for name in FIELDS}
    tensors["step"] = torch.tensor(step, dtype=torch.int64)
    return tensors


def distributed_address() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BirdieIterableDataset(IterableDataset):
    """Batches of `run` from step `start_step` up to `end_step` (exclusive; None: without end).

    url, token: the server (defaults from $BIRDIE_SERVER_URL / $BIRDIE_API_TOKEN).
    rank, world_size: override torch.distributed's. prefetch: steps fetched ahead per worker.
    client_options: passed to `BirdieClient` (timeout, retries, backoff, max_delay).
    The dataset holds only settings, so it pickles into DataLoader workers; each iteration opens
    its own client.
    """

    def __init__(
        self,
        url: str | None,
        run: str,
        start_step: int = 0,
        end_step: int | None = None,
        *,
        token: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 4,
        **client_options: Any,
    ) -> None:
        super().__init__()
        inspect.signature(BirdieClient).bind(url, token, **client_options)  # a typo fails here, not in a worker
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        check_step_range(start_step, end_step)
        self.url = url
        self.token = token
        self.run = run
        self.start_step = start_step
        self.end_step = end_step
        self.prefetch = prefetch
        self.client_options = client_options
        # Taken now when torch.distributed is up: DataLoader worker processes may not see its state.
        self.rank, self.world_size = (rank, world_size) if rank is not None else distributed_address()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        first_step = self.start_step + offset
        if self.end_step is not None and first_step >= self.end_step:
            return  # more workers than steps: this one has none
        with BirdieClient(self.url, self.token, **self.client_options) as client:
            with BatchIterator(
                client,
                self.run,
                self.rank,
                self.world_size,
                start_step=first_step,
                prefetch=self.prefetch,
                end_step=self.end_step,
                step_stride=stride,
            ) as batches:
                for step, batch in batches:
                    yield batch_tensors(step, batch)
