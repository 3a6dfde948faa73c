"""``npz:PATH``: the user's own data set, as one .npz file of arrays, checked."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import NPZ_PREFIX, Dataset, DatasetInfo, _make_dataset

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


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


def _describe_npz() -> DatasetInfo:
    return DatasetInfo(
        name="npz:PATH", available=True, location="PATH (any .npz file)",
        how_to_get="numpy.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)",
        description="your own data: x_train, y_train, x_test, y_test (optional num_classes); x as (N, D) "
                    "vectors or (N, H, W), (N, C, H, W), (N, H, W, C) images, uint8 scaled to [0, 1]; "
                    "y integer labels 0..num_classes-1")
