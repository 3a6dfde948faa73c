"""Where a Trainer's batches come from: slices of in-memory tensors (:class:`BatchSource`), or a
DataLoader for data that is streamed from disk (:class:`StreamedSource`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from ..data import Dataset
from ..data.streaming import StreamedDataset

#: DataLoader worker processes that decode streamed data while the network trains.
LOADER_WORKERS = min(2, os.cpu_count() or 1)


class BatchSource:
    """Training and test batches of in-memory tensors (sliced, never copied sample by sample)."""

    def __init__(self, data: Dataset, limit: int | None, device: torch.device):
        limit = limit or len(data.x_train)
        self.x_train = data.x_train[:limit].to(device)
        self.y_train = data.y_train[:limit].to(device)
        self.x_test = data.x_test.to(device)
        self.y_test = data.y_test.to(device)

    @property
    def train_size(self) -> int:
        return len(self.y_train)

    @property
    def test_size(self) -> int:
        return len(self.y_test)

    def train_batches(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in batches:
            yield self.x_train[index], self.y_train[index]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.test_size, batch_size):
            yield self.x_test[start:start + batch_size], self.y_test[start:start + batch_size]

    def black(self) -> torch.Tensor:
        """Per-channel smallest training value: what augmentation pads with."""
        return self.x_train.amin(dim=(0, *range(2, self.x_train.dim())))


class StreamedSource:
    """Training and test batches of a streamed data set, decoded by DataLoader workers.

    The same index batches as in memory (the epoch's seeded order), so a streamed run sees its
    samples in the order an in-memory run of the same data would.
    """

    def __init__(self, data: StreamedDataset, limit: int | None, device: torch.device, workers: int):
        self.data, self.device, self.workers = data, device, workers
        self.train_size = min(limit or len(data.y_train), len(data.y_train))
        self.test_size = len(data.y_test)

    def _batches(self, split: str, batches: list) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.data.loader(split, batches, self.workers):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches("train", [b.tolist() for b in batches])

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = range(0, self.test_size, batch_size)
        return self._batches("test", [list(range(s, min(s + batch_size, self.test_size))) for s in starts])

    def black(self) -> torch.Tensor:
        """Per-channel smallest value of the first (up to) 512 training images."""
        x, _ = next(self._batches("train", [list(range(min(512, self.train_size)))]))
        return x.amin(dim=(0, 2, 3))


def batch_source(data: Dataset | StreamedDataset, limit: int | None, device: torch.device,
                 workers: int = LOADER_WORKERS) -> BatchSource | StreamedSource:
    if isinstance(data, StreamedDataset):
        return StreamedSource(data, limit, device, workers)
    return BatchSource(data, limit, device)
