"""Shared fixtures: real data loaded once per session, and small slices of it."""

from __future__ import annotations

import pytest
import torch

from localcredit.data import Dataset, load


@pytest.fixture(scope="session")
def fashion() -> Dataset:
    # Real data, never skipped: CI installs it (`make data`); a missing package must fail loudly.
    return load("fashion-mnist")


def subset(data: Dataset, train: int, test: int) -> Dataset:
    return Dataset(name=data.name, x_train=data.x_train[:train], y_train=data.y_train[:train],
                   x_test=data.x_test[:test], y_test=data.y_test[:test], num_classes=data.num_classes)


@pytest.fixture(scope="session")
def fashion_small(fashion) -> Dataset:
    """10k training and 2k test images: enough to see learning in a second or two."""
    return subset(fashion, 10_000, 2_000)


@pytest.fixture(autouse=True)
def _two_threads():
    # Same thread count everywhere, so float reductions (and hence determinism tests) are stable.
    torch.set_num_threads(2)
