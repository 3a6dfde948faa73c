"""``svhn`` (:func:`load_svhn`): the cropped house-number digits, held as uint8 and standardised batch by batch.

The official cropped-digit files ``train_32x32.mat`` and ``test_32x32.mat`` (73,257 and 26,032
images; ``extra_32x32.mat`` is not used), label 10 meaning digit 0. The uint8 pixels stay in
memory as one ``(N, 3, 32, 32)`` tensor per split; items are converted on demand. The Dataset
implements ``__getitems__``: torch's map-style fetcher calls it with a whole batch's indices
when it exists, so a batch is gathered and standardised with a few tensor operations instead
of thousands of per-sample ones. Torch's contract for ``__getitems__`` is "a list of samples",
which ``default_collate`` then stacks; returning an already stacked ``(x, y)`` pair would be
mis-collated (it would try to stack ``x`` with ``y``). So the batch is converted as a whole and
handed out as views of it, one per sample; the stack that follows is one memory copy, and in a
worker it is the copy into shared memory the worker needs anyway. This keeps the Dataset usable
with any DataLoader, ``Subset`` or ``StackDataset``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import DatasetInfo, data_home
from .streaming import StreamedDataset, _one_line, _standardising_affine, _stats_from_histograms

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_IMAGE_SHAPE = (3, 32, 32)
SVHN_CLASSES = [str(digit) for digit in range(10)]
# MATLAB level-5 files (what scipy.io.loadmat reads) start with this text header.
MAT_HEADER = b"MATLAB"


# -------------------------------------------------------------------------------------------- svhn

def _svhn_folder(root: str | Path | None) -> Path:
    return Path(root).expanduser() if root is not None else data_home() / "svhn"


def _svhn_how(folder: Path) -> str:
    return (f"put the official {SVHN_FILES['train']} and {SVHN_FILES['test']} ({SVHN_URL}) in {folder}, "
            f"or pass --data-root")


def _import_loadmat() -> Callable[..., dict[str, Any]]:
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise UserError("svhn needs scipy to read its .mat files; install it with `pip install scipy`") from exc
    return loadmat


def _read_svhn_mat(path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 3, 32, 32), int64 (N,) digits 0..9) from one official .mat file, checked."""
    how = _svhn_how(folder)
    if not path.is_file():
        raise UserError(f"svhn file {path} not found; {how}")
    loadmat = _import_loadmat()
    try:
        contents = loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # any failure to parse a user's file means it is not an SVHN .mat file
        raise UserError(f"cannot read {path} as a MATLAB file ({type(exc).__name__}: {_one_line(exc)}); {how}") from exc
    missing = [key for key in ("X", "y") if not isinstance(contents.get(key), np.ndarray)]
    if missing:
        raise UserError(f"{path} lacks the array(s) {', '.join(missing)}, so it is not an official SVHN file; {how}")
    x, y = contents["X"], contents["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] == 0:
        raise UserError(f"{path} has X of shape {x.shape} and dtype {x.dtype}, expected uint8 (32, 32, 3, N); {how}")
    count = x.shape[3]
    if y.shape not in ((count, 1), (count,)) or not (np.issubdtype(y.dtype, np.integer)
                                                   or np.issubdtype(y.dtype, np.floating)):
        raise UserError(f"{path} has y of shape {y.shape} and dtype {y.dtype} for {count} images, "
                        f"expected numbers of shape ({count}, 1); {how}")
    y = y.reshape(-1)
    bad = ~np.isin(y, np.arange(1, 11))
    if bad.any():
        raise UserError(f"{path} has label {y[bad][0]!r}, outside 1..10 (10 = digit 0); {how}")
    # X[row, column, channel, image] -> [image, channel, row, column], as a contiguous copy.
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, (y.astype(np.int64) % 10)


class SVHNSplit(torch.utils.data.Dataset):
    """One SVHN split held as uint8 in memory; ``__getitems__`` converts a whole batch at once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> None:
        # Tensors rather than numpy arrays: under the spawn start method torch pickles them to the
        # workers through shared memory instead of copying 225 MB into each one.
        self.images = images  # uint8 (N, 3, 32, 32)
        self.labels = labels  # int64 (N,)
        self.mean = torch.from_numpy(mean).to(torch.float32)
        self.std = torch.from_numpy(std).to(torch.float32)
        self._scale, self._shift = _standardising_affine(mean, std)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 (B, 3, 32, 32) standardised, y int64 (B,)) for these indices, with array operations."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[index].to(torch.float32).mul_(self._scale).add_(self._shift)
        return x, self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # A list of samples, as torch's fetcher and default_collate expect (module docstring).
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0)))


def _uint8_channel_histograms(images: torch.Tensor) -> np.ndarray:
    """(C, 256) int64 counts of each channel's values in uint8 (N, C, H, W) images."""
    return np.stack([torch.bincount(images[:, c].reshape(-1), minlength=256).numpy()
                     for c in range(images.shape[1])])


def load_svhn(root: str | Path | None) -> StreamedDataset:
    """SVHN's official train/test .mat files from ``root`` (default ``data_home()/svhn``), standardised on the fly."""
    folder = _svhn_folder(root)
    x_train, y_train = _read_svhn_mat(folder / SVHN_FILES["train"], folder)
    x_test, y_test = _read_svhn_mat(folder / SVHN_FILES["test"], folder)
    images_train, images_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
    labels_train, labels_test = torch.from_numpy(y_train), torch.from_numpy(y_test)
    mean, std = _stats_from_histograms(_uint8_channel_histograms(images_train))
    return StreamedDataset(name="svhn", train=SVHNSplit(images_train, labels_train, mean, std),
                           test=SVHNSplit(images_test, labels_test, mean, std), num_classes=10,
                           input_shape=SVHN_IMAGE_SHAPE, y_train=labels_train, y_test=labels_test,
                           classes=list(SVHN_CLASSES))


def _looks_like_mat(path: Path) -> bool:
    """Cheap availability check: the file exists and starts with MATLAB's text header."""
    try:
        with path.open("rb") as f:
            return f.read(len(MAT_HEADER)) == MAT_HEADER
    except OSError:
        return False


def describe_svhn() -> DatasetInfo:
    """What ``localcredit datasets`` shows for svhn."""
    folder = _svhn_folder(None)
    available = all(_looks_like_mat(folder / f) for f in SVHN_FILES.values())
    return DatasetInfo(
        name="svhn", available=available, location=str(folder), how_to_get=_svhn_how(folder),
        train_samples=73_257 if available else None, test_samples=26_032 if available else None,
        description="SVHN cropped house-number digits: 32x32 colour, 10 classes, official 73,257/26,032 split "
                    "(extra_32x32.mat not used), kept as uint8 and standardised batch by batch")
