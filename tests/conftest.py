"""Shared fixtures: real data loaded once per session, and small slices of it."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from torch import nn

import localcredit as lc
from localcredit.data import Dataset, load


@functools.cache
def fashion_data() -> Dataset:
    # Real data, never skipped: CI installs it (`make data`); a missing package must fail loudly.
    # A plain function too, so that benchmarks/learning_floors.py runs the learning tests' cases.
    return load("fashion-mnist")


def subset(data: Dataset, train: int, test: int) -> Dataset:
    return Dataset(name=data.name, x_train=data.x_train[:train], y_train=data.y_train[:train],
                   x_test=data.x_test[:test], y_test=data.y_test[:test], num_classes=data.num_classes)


def fashion_small_data() -> Dataset:
    """10k training and 2k test images: enough to see learning in a second or two."""
    return subset(fashion_data(), 10_000, 2_000)


def fashion_deep_data() -> Dataset:
    """3k training and 1k test images: what the deep-network learning tests train on."""
    return subset(fashion_data(), 3_000, 1_000)


@pytest.fixture(scope="session")
def fashion() -> Dataset:
    return fashion_data()


@pytest.fixture(scope="session", autouse=True)
def _shared_data_left_unchanged():
    # Every test shares fashion_data()'s tensors (subsets are views): one that writes into them changes
    # what the tests after it see, depending on the order. Checked once, when the session ends.
    yield
    if fashion_data.cache_info().currsize:
        data, fresh = fashion_data(), load("fashion-mnist")
        changed = [k for k in ("x_train", "y_train", "x_test", "y_test")
                   if not torch.equal(getattr(data, k), getattr(fresh, k))]
        assert not changed, f"a test wrote into the shared Fashion-MNIST tensors: {changed}"


@pytest.fixture(scope="session")
def fashion_small() -> Dataset:
    return fashion_small_data()


@pytest.fixture(autouse=True)
def _two_threads():
    # Same thread count everywhere, so float reductions (and hence determinism tests) are stable: 2, or
    # 1 when tests/run_shards.py runs two pytest processes side by side (the learning floors hold for both).
    torch.set_num_threads(int(os.environ.get("LOCALCREDIT_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def fashion_deep() -> Dataset:
    return fashion_deep_data()


#: The deep networks every rule is tested on (the user's own is built by :func:`user_conv_net`).
DEEP_NETWORKS = {
    "vgg": dict(arch="vgg", channels="16,M,32,M", hidden=[64]),  # conv-BN-ReLU-pool blocks, Linear-BN1d-ReLU
    "resnet": dict(arch="resnet", depth=8, width=0.5),  # a stem and 3 residual units (8, 16, 32 channels)
}


def user_conv_net() -> lc.BlockNet:
    """A researcher's own conv net with batch norm, as one flat nn.Sequential grouped into blocks."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    return lc.blocknet(model, input_shape=(1, 28, 28), num_classes=10, group=[4, 4, 2])


@pytest.fixture(scope="session")
def fashion_3k_npz(fashion, tmp_path_factory) -> str:
    """3,000 training and 500 test images of the real data set, as an .npz that loads in milliseconds
    (for commands that run in other processes)."""
    path = tmp_path_factory.mktemp("data") / "fashion-3k.npz"
    np.savez(path, x_train=fashion.x_train[:3000].numpy(), y_train=fashion.y_train[:3000].numpy(),
             x_test=fashion.x_test[:500].numpy(), y_test=fashion.y_test[:500].numpy())
    return f"npz:{path}"
