"""What every data source shares: the :class:`Dataset` type, the names of the data forms, where data lives,
standardisation and the seeded, stratified splits.

The lowest module of the data package: ``sources`` (data sets held in memory), ``streaming`` (data
streamed from disk) and the per-data-set loaders all build on it, and it imports none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

DEFAULT_DATA_HOME = Path("/usr/share/datasets")
NPZ_PREFIX = "npz:"
#: ``val:NAME`` = NAME's training split, cut into training and validation parts (the test split is never used).
VALIDATION_PREFIX = "val:"
VALIDATION_FRACTION = 1 / 6  # 10,000 of Fashion-MNIST's 60,000, the size of its test split
VALIDATION_SPLIT_SEED = 0
IMAGEFOLDER_PREFIX = "imagefolder:"
#: The named data sets that are streamed from disk (``localcredit.experiment.load_data`` routes them here).
STREAMED_DATASETS = ("svhn",)

# A (nearly) constant channel would otherwise be divided by ~0 and blow up to inf/NaN.
STD_FLOOR = 1e-6


@dataclass
class Dataset:
    """One data set, both splits held whole as tensors (inputs standardised, labels 0..num_classes-1).

    ``name``: what ``load`` was given (``"fashion-mnist"``). ``x_train``: float32 inputs, (N, C, H, W)
    for images, (N, D) for vectors, standardised with the training split's mean and std (per channel
    for images). ``y_train``: int64 class indices, (N,). ``x_test``, ``y_test``: the test split, the
    same way (standardised with the *training* statistics). ``num_classes``: C, labels are 0..C-1.
    ``input_shape``: one sample's shape, (C, H, W) or (D,).
    """

    name: str
    x_train: torch.Tensor  # float32, (N, C, H, W) for images, (N, D) for vectors
    y_train: torch.Tensor  # int64, (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) or (D,)."""
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        """True for (N, C, H, W) inputs."""
        return self.x_train.dim() == 4

    def limited(self, limit_train: int | None) -> Dataset:
        """The first ``limit_train`` training samples (None: all) and the whole test split, as ``--limit-train``
        trains on: standardised as before, with the whole training split's statistics."""
        if limit_train is None:
            return self
        if isinstance(limit_train, bool) or not isinstance(limit_train, int) or limit_train < 1:
            raise UserError(f"limit_train={limit_train!r} must be a positive number of training samples")
        return replace(self, x_train=self.x_train[:limit_train].clone(), y_train=self.y_train[:limit_train].clone())

    def to(self, device: str | torch.device) -> Dataset:
        """Both splits on ``device`` ("cpu", "cuda", "cuda:N", "auto": CUDA when there is one)."""
        where = checked_device(device, "load")
        return replace(self, x_train=self.x_train.to(where), y_train=self.y_train.to(where),
                       x_test=self.x_test.to(where), y_test=self.y_test.to(where))


def checked_device(name: str | torch.device, who: str) -> torch.device:
    """``name`` as a device this machine has ("auto": CUDA when there is one); a one-line UserError from
    ``who`` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{who}: unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{who}: device {name!r} was asked for but torch sees no CUDA device")
    return device


@dataclass
class DatasetInfo:
    """What ``localcredit datasets`` shows for one data set."""

    name: str
    available: bool
    location: str
    how_to_get: str
    description: str
    train_samples: int | None = None  # of the split in use, when available and cheap to know
    test_samples: int | None = None


# --------------------------------------------------------------------------------------------- paths

def data_home() -> Path:
    """The folder holding one sub-folder per data set: ``$LOCALCREDIT_DATA``, else /usr/share/datasets."""
    return Path(os.environ.get("LOCALCREDIT_DATA") or DEFAULT_DATA_HOME).expanduser()


def cache_dir() -> Path:
    """Where prepared data is cached: ``$LOCALCREDIT_CACHE``, else ~/.cache/localcredit."""
    env = os.environ.get("LOCALCREDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "localcredit"


def _root_for(name: str, root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser() if root is not None else data_home() / name


# ------------------------------------------------------------------------------------------- splits

def validation_split(data: Dataset, fraction: float = VALIDATION_FRACTION,
                     seed: int = VALIDATION_SPLIT_SEED) -> Dataset:
    """Hold out a fixed, stratified ``fraction`` of the *training* split as the evaluation split.

    What tuning runs train and evaluate on (``--data val:NAME``), so hyper-parameters are chosen
    without ever looking at the test split. The inputs keep the standardisation of the whole
    training split (statistics of training data only; the held-out part shifts them negligibly).
    """
    labels = data.y_train.numpy()
    train_np, held_out_np = stratified_split(labels, round(len(labels) * fraction), seed)
    train, held_out = torch.from_numpy(train_np), torch.from_numpy(held_out_np)
    return Dataset(name=VALIDATION_PREFIX + data.name, x_train=data.x_train[train], y_train=data.y_train[train],
                   x_test=data.x_train[held_out], y_test=data.y_train[held_out], num_classes=data.num_classes)

def stratified_split(labels: np.ndarray, test_total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, seeded, stratified split of ``labels`` into (train indices, test indices).

    Each class c with n_c samples gets test_total * n_c / N test samples rounded by the largest-
    remainder method (floors first, then one more for the classes with the largest remainders, ties
    to the lower class), so the test split has exactly ``test_total`` samples and each class's share
    is within one sample of exact. Classes are visited in ascending order; one
    ``numpy.random.default_rng(seed)`` shuffles each class's indices, the first ones go to test.
    Finally both index lists are shuffled with the same generator so that any prefix of either split
    (``--limit-train``) holds every class rather than only the first ones.
    """
    labels = np.asarray(labels)
    if not 0 <= test_total <= len(labels):
        raise ValueError(f"test_total must be in 0..{len(labels)}, got {test_total}")
    classes, counts = np.unique(labels, return_counts=True)
    # Integer arithmetic so that ties between equal remainders are exact, not float noise.
    quotas = counts * test_total // len(labels)
    remainders = counts * test_total % len(labels)
    extra = test_total - int(quotas.sum())
    quotas[np.argsort(-remainders, kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls, quota in zip(classes, quotas):
        shuffled = rng.permutation(np.flatnonzero(labels == cls))
        test.append(shuffled[:quota])
        train.append(shuffled[quota:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# -------------------------------------------------------------------------------------- standardise

def _make_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray, num_classes: int) -> Dataset:
    """Convert checked numpy splits (inputs already (N, D) or (N, C, H, W)) to a standardised Dataset."""
    xs_train, xs_test = _to_float(x_train), _to_float(x_test)
    _standardise(xs_train, xs_test)
    return Dataset(name=name, x_train=xs_train, y_train=torch.from_numpy(y_train.astype(np.int64)),
                   x_test=xs_test, y_test=torch.from_numpy(y_test.astype(np.int64)), num_classes=num_classes)


def _to_float(x: np.ndarray) -> torch.Tensor:
    """A new C-contiguous float32 tensor; uint8 pixels are scaled to [0, 1]."""
    # torch converts with several threads, about ten times faster than numpy's astype here; it
    # needs a writable array (np.frombuffer's are not) and must copy, since standardising works in place.
    source = torch.from_numpy(np.require(x, requirements="W"))
    out = source.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    if x.dtype == np.uint8:
        out.div_(255.0)
    return out


def _standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> None:
    """In place: subtract the training mean and divide by the training std (per channel for images).

    The test split uses the training statistics so that no information leaks from it.
    """
    dims = (0, 2, 3) if x_train.dim() == 4 else tuple(range(x_train.dim()))
    # Sums in float64: a float32 sum's rounding depends on how many threads split it, and the inputs
    # must be the same bits whatever torch.get_num_threads() was when the data were loaded.
    mean = x_train.mean(dim=dims, keepdim=True, dtype=torch.float64).to(torch.float32)
    x_train.sub_(mean)
    # Variance of the already centred data: much faster than torch.std_mean.
    variance = x_train.square().mean(dim=dims, keepdim=True, dtype=torch.float64).to(torch.float32)
    std = variance.sqrt_().clamp_min_(STD_FLOOR)
    x_train.div_(std)
    x_test.sub_(mean).div_(std)


def _check_label_range(y: np.ndarray, num_classes: int, what: str) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise UserError(f"{what} has label {bad}, outside 0..{num_classes - 1}; "
                        f"the file is corrupt or not this data set")
