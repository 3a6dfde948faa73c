"""CIFAR-10 from the official python-pickle batches, unpickled safely."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .base import Dataset, DatasetInfo, _check_label_range, _make_dataset, _root_for, data_home

CIFAR_SUBDIR = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_IMAGE_SHAPE = (3, 32, 32)


# ----------------------------------------------------------------------------------------- cifar10

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, nothing else.

    The official CIFAR-10 batches are pickles, and a pickle can run arbitrary code; only the globals
    numpy arrays need (old and new numpy module paths, and ``_codecs.encode`` used by protocol-2
    bytes) are allowed, so a hostile file given with --data-root fails instead of executing.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_folder(root: Path) -> Path:
    """``root`` itself, or its ``cifar-10-batches-py`` subfolder (how the official archive extracts)."""
    names = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
    if not any((root / n).is_file() for n in names) and (root / CIFAR_SUBDIR).is_dir():
        return root / CIFAR_SUBDIR
    return root


def _cifar_files(root: Path) -> tuple[list[Path], Path | None]:
    """(existing training batches, test batch or None) in ``root`` or its official subfolder."""
    folder = _cifar_folder(root)
    train = [folder / n for n in CIFAR_TRAIN_BATCHES if (folder / n).is_file()]
    test = folder / CIFAR_TEST_BATCH
    return train, test if test.is_file() else None


def _batch_entry(batch: dict, key: str) -> Any:
    # Official batches were pickled by Python 2, so keys come back as bytes; accept str too.
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 3, 32, 32), int64 (N,)) from one python-pickle batch, checked."""
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any failure to unpickle a user's file means the file is not a batch
        raise UserError(f"cannot read CIFAR-10 batch {path} ({type(exc).__name__}: {exc}); "
                        f"use the python version of CIFAR-10") from exc
    data = _batch_entry(batch, "data") if isinstance(batch, dict) else None
    labels = _batch_entry(batch, "labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise UserError(f"{path} is not a CIFAR-10 python batch (a dict with b'data' and b'labels')")
    pixels = math.prod(CIFAR_IMAGE_SHAPE)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise UserError(f"{path} has data of shape {data.shape} and dtype {data.dtype}, "
                        f"expected uint8 (N, {pixels})")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path} has {labels.size} labels of dtype {labels.dtype} for {len(data)} images, "
                        f"expected one integer label per image")
    _check_label_range(labels, 10, str(path))
    # Each row is the red plane, then green, then blue, each 32x32 row-major: channels-first as is.
    return data.reshape(-1, *CIFAR_IMAGE_SHAPE), labels.astype(np.int64)


def _load_cifar10(root: str | os.PathLike | None) -> Dataset:
    """CIFAR-10 from the python-pickle batches (any of data_batch_1..5 that exist, plus test_batch)."""
    path = _root_for("cifar10", root)
    train_files, test_file = _cifar_files(path)
    if not train_files or test_file is None:
        raise UserError(f"cifar10 batches not found in {path} (need test_batch and at least one data_batch_N, "
                        f"directly or in {CIFAR_SUBDIR}/); {_CIFAR_HOW.format(path=path)}")
    batches = [_read_cifar_batch(f) for f in train_files]
    x_test, y_test = _read_cifar_batch(test_file)
    x_train = np.concatenate([x for x, _ in batches])
    y_train = np.concatenate([y for _, y in batches])
    return _make_dataset("cifar10", x_train, y_train, x_test, y_test, 10)


_CIFAR_HOW = ("download the python version of CIFAR-10 (https://www.cs.toronto.edu/~kriz/cifar.html) "
              "and extract it to {path}, or pass --data-root")


def _describe_cifar10() -> DatasetInfo:
    path = data_home() / "cifar10"
    train, test = _cifar_files(path)
    available = bool(train) and test is not None  # the loader takes any of the five training batches
    official = available and len(train) == len(CIFAR_TRAIN_BATCHES)  # counted only for the official files
    return DatasetInfo(
        name="cifar10", available=available, location=str(_cifar_folder(path)),
        train_samples=50_000 if official else None, test_samples=10_000 if official else None,
        how_to_get=_CIFAR_HOW.format(path=path),
        description="CIFAR-10: 32x32 colour images, 10 classes, official python-pickle batches (50,000/10,000)")
