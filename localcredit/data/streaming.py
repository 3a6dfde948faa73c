"""Data sets too large to hold as float tensors, served through ``torch.utils.data.DataLoader``.

``sources.load`` converts whole splits to float32 tensors up front. That is the fastest way for
Fashion-MNIST or CIFAR-10, but not possible for a folder of 100,000 photos, and wasteful for SVHN
(99k colour images: 1.2 GB as float32, 0.3 GB as uint8). A :class:`StreamedDataset` instead holds
each split as a map-style ``torch.utils.data.Dataset`` whose items are decoded on demand, plus what
the trainer needs without decoding anything: all labels (``y_train``/``y_test``, in item order, for
stratified batching or class counts), the number of classes, the input shape and the class names.
:meth:`StreamedDataset.loader` turns a list of index batches into a DataLoader, optionally with
worker processes that decode while the network trains.

The same promises as ``sources`` hold for what comes out: items are ``(x, y)`` with ``x`` float32
``(C, H, W)``, pixels scaled to [0, 1] then standardised per channel with *training* statistics
(the test split uses them too), and ``y`` an int64 scalar tensor. Every problem the user can fix is
found before training starts and raised as :class:`UserError` with one line naming the path.

Two sources build on it: ``imagefolder:PATH`` (module ``imagefolder``) and ``svhn`` (module ``svhn``).

Errors while decoding in a worker: torch re-raises a worker's exception in the main process as
``type(exc)("Caught ... Original Traceback ...")``, a many-line message. :class:`ImageDecodeError`
(a ``UserError``) recognises that message and keeps only its own original line.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import UserError
from .base import STD_FLOOR

SPLITS = ("train", "test")


# ------------------------------------------------------------------------------------------ dataset

@dataclass
class StreamedDataset:
    """One data set whose splits are decoded on demand (see the module docstring)."""

    name: str
    train: torch.utils.data.Dataset  # item i -> (x float32 (C, H, W), standardised; y int64 scalar)
    test: torch.utils.data.Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W)
    y_train: torch.Tensor  # int64 (N_train,), the labels of the train items, in item order
    y_test: torch.Tensor
    classes: list[str]  # class names (imagefolder) or digits (svhn)

    @property
    def is_image(self) -> bool:
        """Always True: like ``base.Dataset.is_image``, for code that handles both kinds."""
        return True

    def loader(self, split: str, batches: Sequence[Sequence[int]], workers: int) -> DataLoader:
        """A DataLoader yielding (x (B,C,H,W), y (B,)) for exactly these index batches, in this order.

        The batches become the DataLoader's ``batch_sampler``, once each is known to be non-empty and in range.
        ``workers`` > 0 decodes in that many worker processes (each limited to one torch thread, so
        they do not compete with training for cores); 0 decodes in the calling process.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        dataset = self.train if split == "train" else self.test
        # Both kinds of split (ImageFolderSplit, SVHNSplit) have a length; torch's Dataset type does not say so.
        checked = _checked_batches(batches, len(cast(Sized, dataset)))
        return DataLoader(dataset, batch_sampler=checked, num_workers=workers, persistent_workers=False,
                          worker_init_fn=_limit_worker_threads if workers > 0 else None)


def _checked_batches(batches: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """The batches as lists of ints, each non-empty and every index in 0..size-1.

    Checked here because torch would wrap a negative index silently, and an empty batch fails deep
    inside collation with an unhelpful IndexError.
    """
    checked = []
    for number, batch in enumerate(batches):
        indices = [operator.index(i) for i in batch]  # rejects floats, accepts numpy integers
        if not indices:
            raise ValueError(f"batch {number} is empty")
        bad = [i for i in indices if not 0 <= i < size]
        if bad:
            raise ValueError(f"batch {number} has index {bad[0]}, outside 0..{size - 1}")
        checked.append(indices)
    return checked


def _limit_worker_threads(worker_id: int) -> None:
    # Torch's worker loop already sets one thread (torch 2.13); saying it here keeps that true if
    # the default changes, since several workers with many threads each would starve training.
    torch.set_num_threads(1)


class ImageDecodeError(UserError):
    """An image that passed the scan but cannot be decoded now (changed or truncated since).

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    ``ImageDecodeError("Caught ImageDecodeError in DataLoader worker ...\\nOriginal Traceback ...")``;
    the constructor then keeps only the original one-line message.
    """

    def __init__(self, message: str) -> None:
        last_line = message.rstrip().rsplit("\n", 1)[-1]
        origin = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "\n" in message.rstrip() and last_line.startswith(origin):
            message = last_line[len(origin):]
        super().__init__(message)


def _one_line(exc: BaseException) -> str:
    """The exception's message with all whitespace runs (newlines included) collapsed to one space."""
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------------------- statistics

def _stats_from_histograms(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) in [0, 1] units from (C, 256) counts of 8-bit values: exact, no rounding build-up."""
    values = np.arange(256, dtype=np.float64) / 255.0
    totals = counts.sum(axis=1)
    mean = counts @ values / totals
    var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / totals
    return mean, np.maximum(np.sqrt(var), STD_FLOOR)


def _standardising_affine(mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each float32 (C, 1, 1), so that standardised = uint8 value * scale + shift.

    One multiply-add replaces divide-by-255, subtract-mean, divide-by-std.
    """
    scale = torch.from_numpy(1.0 / (255.0 * std)).to(torch.float32).view(-1, 1, 1)
    shift = torch.from_numpy(-mean / std).to(torch.float32).view(-1, 1, 1)
    return scale, shift
