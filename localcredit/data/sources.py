"""Named data sets -> standardised tensors.

``load(name, root)`` returns a :class:`Dataset` holding each split as one tensor: the inputs are
float32, scaled to [0, 1] when stored as uint8, then standardised with the *training* split's mean
and standard deviation (per channel for images, one mean/std for vectors) and the labels are int64.
Whole splits are converted with array operations, never sample by sample, so the 60,000
Fashion-MNIST images load in well under two seconds.

Where the files are looked for: the ``root`` argument (the CLI's ``--data-root``, pointing directly
at one data set's files) wins; otherwise ``data_home()/<name>``. Every problem the user can fix
(unknown name, missing or malformed files, bad shapes or labels) raises :class:`UserError` with one
sentence saying what is wrong and how to fix it.

This module is the registry of the named data sets; the loaders live in ``mnist`` (MNIST and
Fashion-MNIST), ``cifar`` and ``npz``, on the shared base of ``base`` (Dataset, standardisation, splits).
"""

from __future__ import annotations

import os

import torch

from ..errors import UserError, did_you_mean
from .base import (
    IMAGEFOLDER_PREFIX,
    NPZ_PREFIX,
    STREAMED_DATASETS,
    VALIDATION_PREFIX,
    Dataset,
    DatasetInfo,
    validation_split,
)
from .cifar import _describe_cifar10, _load_cifar10
from .mnist import _describe_fashion_mnist, _describe_mnist, _load_fashion_mnist, _load_mnist
from .npz import _describe_npz, _load_npz

NAMED_DATASETS = ("fashion-mnist", "mnist", "cifar10")


def dataset_names() -> list[str]:
    """The named data sets; ``load`` also accepts ``npz:PATH``."""
    return list(NAMED_DATASETS)


# ------------------------------------------------------------------------------------------ loading

def load(name: str, root: str | os.PathLike | None = None, *, limit_train: int | None = None,
         device: str | torch.device | None = None) -> Dataset:
    """Load a named data set (see :func:`dataset_names`) or ``npz:PATH``, standardised, as tensors.

    ``root`` is the folder holding the named data set's files (default ``data_home()/<name>``);
    ``npz:PATH`` names its file itself and ignores it. ``limit_train`` keeps the first N training
    samples (as ``--limit-train``: standardised with the whole training split's statistics) and the
    whole test split; ``device`` ("cpu", "cuda", "auto") puts both splits there.
    """
    data = _load(name, root).limited(limit_train)
    return data.to(device) if device is not None else data


def _load(name: str, root: str | os.PathLike | None) -> Dataset:
    if name.startswith(VALIDATION_PREFIX):
        return validation_split(load(name[len(VALIDATION_PREFIX):], root))
    if name.startswith(NPZ_PREFIX):
        return _load_npz(name[len(NPZ_PREFIX):])
    loaders = {"fashion-mnist": _load_fashion_mnist, "mnist": _load_mnist, "cifar10": _load_cifar10}
    if name not in loaders:
        from . import data_names  # the whole list (streamed data sets included), made in the package

        if name in STREAMED_DATASETS or name.startswith(IMAGEFOLDER_PREFIX):
            raise UserError(f"{name} is streamed from disk (`--data {name}` trains on it); {VALIDATION_PREFIX}NAME "
                            f"and load() take a data set held in memory: {', '.join(NAMED_DATASETS)} or "
                            f"{NPZ_PREFIX}PATH")
        raise UserError(f"unknown dataset {name!r}{did_you_mean(name, data_names())}; "
                        f"choose one of {', '.join(data_names())}")
    return loaders[name](root)


def describe_all() -> list[DatasetInfo]:
    """One entry per named data set, plus ``npz:PATH``: whether it is here, where, and how to get it."""
    return [_describe_fashion_mnist(), _describe_mnist(), _describe_cifar10(), _describe_npz()]
