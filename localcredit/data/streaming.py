"""Data sets too large to hold as float tensors, served through ``torch.utils.data.DataLoader``.

``sources.load`` converts whole splits to float32 tensors up front. That is the fastest way for
Fashion-MNIST or CIFAR-10, but not possible for a folder of 100,000 photos, and wasteful for SVHN
(99k colour images: 1.2 GB as float32, 0.3 GB as uint8). A :class:`StreamedDataset` instead holds
each split as a map-style ``torch.utils.data.Dataset`` whose items are decoded on demand, plus what
the trainer needs without decoding anything: all labels (``y_train``/``y_test``, in item order, for
stratified batching or class counts), the number of classes, the input shape and the class names.
:meth:`StreamedDataset.loader` turns a list of index batches into a DataLoader, optionally with
worker processes that decode while the network trains.

The same promises as ``sources`` hold for what comes out: items are ``(x, y)`` with ``x`` float32
``(C, H, W)``, pixels scaled to [0, 1] then standardised per channel with *training* statistics
(the test split uses them too), and ``y`` an int64 scalar tensor. Every problem the user can fix is
found before training starts and raised as :class:`UserError` with one line naming the path.

Two sources:

``imagefolder:PATH`` (:func:`load_imagefolder`)
    One sub-folder per class (class names = sorted folder names; files in nested folders count for
    their class folder; names starting with "." are skipped). If PATH has ``train/`` and ``val/``,
    those are the splits; otherwise a fixed, stratified sixth of all images is held out as the test
    split (``sources.stratified_split(labels, round(N / 6), seed=0)``). Loading *scans* every file:
    PIL reads its header and checks it with ``Image.verify``, so an unreadable file, an empty class
    folder or images of different sizes are reported now, not hours into training (``verify`` does
    not decode JPEG data: a truncated JPEG is reported when it is decoded, by
    :class:`ImageDecodeError`, one line). The pixels are decoded lazily, in
    ``__getitem__`` (so in the DataLoader's workers). Images become RGB if any image of the data set
    is colour, else one grey channel; with ``image_size`` the shorter side is resized to it
    (bilinear) and the centre ``image_size x image_size`` cropped. The per-channel mean and std come
    from at most :data:`STATS_SAMPLE_SIZE` training images drawn with
    ``numpy.random.default_rng(STATS_SEED)``, decoded exactly as training decodes them; they are
    computed exactly, from 256-bin histograms of the 8-bit values.

``svhn`` (:func:`load_svhn`)
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

Errors while decoding in a worker: torch re-raises a worker's exception in the main process as
``type(exc)("Caught ... Original Traceback ...")``, a many-line message. :class:`ImageDecodeError`
(a ``UserError``) recognises that message and keeps only its own original line.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImagePalette
from torch.utils.data import DataLoader

from ..errors import UserError
from .sources import STD_FLOOR, DatasetInfo, data_home, stratified_split

IMAGEFOLDER_PREFIX = "imagefolder:"
#: The named data sets that are streamed from disk (``localcredit.experiment.load_data`` routes them here).
STREAMED_DATASETS = ("svhn",)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
TRAIN_FOLDER, VAL_FOLDER = "train", "val"
# Palette layouts whose grey entries can be recognised from the header: 3 or 4 bytes per entry.
GREY_CHECKABLE_PALETTES = frozenset({"RGB", "BGR", "RGBX", "BGRX", "RGBA", "BGRA"})
#: The flat layout's held-out test share, and the seed of its stratified split.
IMAGEFOLDER_TEST_FRACTION = 1 / 6
IMAGEFOLDER_SPLIT_SEED = 0
#: Standardisation statistics come from at most this many training images, drawn with this seed.
STATS_SAMPLE_SIZE = 2000
STATS_SEED = 0

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_IMAGE_SHAPE = (3, 32, 32)
SVHN_CLASSES = [str(digit) for digit in range(10)]
# MATLAB level-5 files (what scipy.io.loadmat reads) start with this text header.
MAT_HEADER = b"MATLAB"

SPLITS = ("train", "test")


# ------------------------------------------------------------------------------------------ dataset

@dataclass
class StreamedDataset:
    """One data set whose splits are decoded on demand (see the module docstring)."""

    name: str
    train: torch.utils.data.Dataset  # item i -> (x float32 (C, H, W), standardised; y int64 scalar)
    test: torch.utils.data.Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W)
    y_train: torch.Tensor  # int64 (N_train,), the labels of the train items, in item order
    y_test: torch.Tensor
    classes: list[str]  # class names (imagefolder) or digits (svhn)

    @property
    def is_image(self) -> bool:
        """Always True: like ``sources.Dataset.is_image``, for code that handles both kinds."""
        return True

    def loader(self, split: str, batches: Sequence[Sequence[int]], workers: int) -> DataLoader:
        """A DataLoader yielding (x (B,C,H,W), y (B,)) for exactly these index batches, in this order.

        The batches become the DataLoader's ``batch_sampler``, once each is known to be non-empty and in range.
        ``workers`` > 0 decodes in that many worker processes (each limited to one torch thread, so
        they do not compete with training for cores); 0 decodes in the calling process.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        dataset = self.train if split == "train" else self.test
        checked = _checked_batches(batches, len(dataset))
        return DataLoader(dataset, batch_sampler=checked, num_workers=workers, persistent_workers=False,
                          worker_init_fn=_limit_worker_threads if workers > 0 else None)


def _checked_batches(batches: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """The batches as lists of ints, each non-empty and every index in 0..size-1.

    Checked here because torch would wrap a negative index silently, and an empty batch fails deep
    inside collation with an unhelpful IndexError.
    """
    checked = []
    for number, batch in enumerate(batches):
        indices = [operator.index(i) for i in batch]  # rejects floats, accepts numpy integers
        if not indices:
            raise ValueError(f"batch {number} is empty")
        bad = [i for i in indices if not 0 <= i < size]
        if bad:
            raise ValueError(f"batch {number} has index {bad[0]}, outside 0..{size - 1}")
        checked.append(indices)
    return checked


def _limit_worker_threads(worker_id: int) -> None:
    # Torch's worker loop already sets one thread (torch 2.13); saying it here keeps that true if
    # the default changes, since several workers with many threads each would starve training.
    torch.set_num_threads(1)


class ImageDecodeError(UserError):
    """An image that passed the scan but cannot be decoded now (changed or truncated since).

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    ``ImageDecodeError("Caught ImageDecodeError in DataLoader worker ...\\nOriginal Traceback ...")``;
    the constructor then keeps only the original one-line message.
    """

    def __init__(self, message: str) -> None:
        last_line = message.rstrip().rsplit("\n", 1)[-1]
        origin = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "\n" in message.rstrip() and last_line.startswith(origin):
            message = last_line[len(origin):]
        super().__init__(message)


def _one_line(exc: BaseException) -> str:
    """The exception's message with all whitespace runs (newlines included) collapsed to one space."""
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------------------- statistics

def _stats_from_histograms(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) in [0, 1] units from (C, 256) counts of 8-bit values: exact, no rounding build-up."""
    values = np.arange(256, dtype=np.float64) / 255.0
    totals = counts.sum(axis=1)
    mean = counts @ values / totals
    var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / totals
    return mean, np.maximum(np.sqrt(var), STD_FLOOR)


def _standardising_affine(mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each float32 (C, 1, 1), so that standardised = uint8 value * scale + shift.

    One multiply-add replaces divide-by-255, subtract-mean, divide-by-std.
    """
    scale = torch.from_numpy(1.0 / (255.0 * std)).to(torch.float32).view(-1, 1, 1)
    shift = torch.from_numpy(-mean / std).to(torch.float32).view(-1, 1, 1)
    return scale, shift


# ------------------------------------------------------------------------------------- imagefolder

@dataclass(frozen=True)
class _ImageHeader:
    """What the scan learns about one file without decoding its pixels."""

    path: Path
    colour: bool
    size: tuple[int, int]  # PIL's (width, height)


def _inspect_image(path: Path) -> _ImageHeader:
    """Open and ``verify()`` one image (header and, for PNG, chunk checksums); UserError if PIL cannot."""
    try:
        with Image.open(path) as image:
            header = _ImageHeader(path, _is_colour(image), image.size)
            image.verify()
    except Exception as exc:  # whatever PIL raises for a user's file means it is not a usable image
        raise UserError(f"cannot read image {path} ({type(exc).__name__}: {_one_line(exc)}); "
                        f"replace or delete it") from exc
    return header


def _is_colour(image: Image.Image) -> bool:
    """Whether the opened (not decoded) image has colour; a palette image is colour unless all its entries are grey."""
    if image.mode in ("P", "PA"):
        return _palette_is_colour(image.palette)
    return Image.getmodebase(image.mode) != "L"


def _palette_is_colour(palette: ImagePalette.ImagePalette | None) -> bool:
    """False only when the palette, as read from the header, certainly holds grey entries only."""
    # The bytes are in ``rawmode``'s layout when the file gave one (BMP: BGRX), else in ``mode``'s.
    layout = (palette.rawmode or palette.mode) if palette is not None else None
    if layout not in GREY_CHECKABLE_PALETTES or not isinstance(palette.palette, bytes):
        return True  # cannot tell without decoding: colour is the safe choice (no information lost)
    width = len(layout)
    entries = np.frombuffer(palette.palette, dtype=np.uint8)
    entries = entries[: len(entries) // width * width].reshape(-1, width)[:, :3]
    # R, G, B in any order: grey means all three equal, whichever is first.
    return bool((entries != entries[:, :1]).any())


def _is_hidden(name: str) -> bool:
    # Dot-folders (.ipynb_checkpoints, .git) and macOS "._x.jpg" resource files are not images.
    return name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    """The non-hidden sub-folders of ``folder``, sorted by name; UserError if there are none."""
    subfolders = sorted((p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name)),
                        key=lambda p: p.name)
    if not subfolders:
        raise UserError(f"no class folders in {folder}; put each class's images in its own sub-folder "
                        f"({folder}/CLASS/*.png)")
    return subfolders


def _image_files(class_folder: Path) -> list[Path]:
    """Image files in ``class_folder`` and its sub-folders, sorted; UserError if there are none."""
    found = []
    for parent, dirs, files in os.walk(class_folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))  # in place: os.walk then skips and orders them
        found += [Path(parent, f) for f in sorted(files)
                  if not _is_hidden(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    if not found:
        raise UserError(f"class folder {class_folder} has no images "
                        f"({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}); add some or remove the folder")
    return found


def _scan_split(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """(class names, image files, int64 labels) of one folder of class folders."""
    classes, files, labels = [], [], []
    for label, class_folder in enumerate(_class_folders(folder)):
        images = _image_files(class_folder)
        classes.append(class_folder.name)
        files += images
        labels += [label] * len(images)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _has_split_layout(root: Path) -> bool:
    """True when ``root`` has train/ and val/; UserError when it has only one of them."""
    train, val = (root / TRAIN_FOLDER).is_dir(), (root / VAL_FOLDER).is_dir()
    if train != val:
        have, lack = (TRAIN_FOLDER, VAL_FOLDER) if train else (VAL_FOLDER, TRAIN_FOLDER)
        raise UserError(f"{root} has {have}/ but no {lack}/; use both (each with the same class folders) "
                        f"or neither (class folders directly in {root})")
    return train


def _check_same_classes(root: Path, train: list[str], val: list[str]) -> None:
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise UserError(f"{root}/{TRAIN_FOLDER} and {root}/{VAL_FOLDER} have different class folders "
                        f"(only in {TRAIN_FOLDER}/: {', '.join(only_train) or '-'}; "
                        f"only in {VAL_FOLDER}/: {', '.join(only_val) or '-'}); both need the same ones")


def _split_folder_files(root: Path) -> tuple[list[str], tuple[list[Path], np.ndarray], tuple[list[Path], np.ndarray]]:
    """(classes, (train files, labels), (test files, labels)) for either layout."""
    if _has_split_layout(root):
        classes, train_files, train_labels = _scan_split(root / TRAIN_FOLDER)
        val_classes, test_files, test_labels = _scan_split(root / VAL_FOLDER)
        _check_same_classes(root, classes, val_classes)
        return classes, (train_files, train_labels), (test_files, test_labels)
    classes, files, labels = _scan_split(root)
    test_total = round(len(files) * IMAGEFOLDER_TEST_FRACTION)
    if test_total == 0:
        raise UserError(f"{root} has only {len(files)} image(s), too few to hold out a sixth as the test split; "
                        f"add images or use train/ and val/ folders")
    train, test = stratified_split(labels, test_total, seed=IMAGEFOLDER_SPLIT_SEED)
    return (classes, ([files[i] for i in train], labels[train]), ([files[i] for i in test], labels[test]))


def _check_one_size(root: Path, headers: list[_ImageHeader]) -> tuple[int, int]:
    """The (width, height) all images share; UserError naming two that differ."""
    first = headers[0]
    for header in headers:
        if header.size != first.size:
            (w1, h1), (w2, h2) = first.size, header.size
            raise UserError(f"images in {root} have different sizes ({first.path} is {w1}x{h1}, {header.path} is "
                            f"{w2}x{h2}); pass --image-size N to resize them all to NxN")
    return first.size


def _resize_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side resized to ``size`` (bilinear, aspect kept), then the centre size x size cropped."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _decode_image(path: str | Path, grey: bool, image_size: int | None) -> np.ndarray:
    """uint8 pixels, (H, W) when ``grey`` else (H, W, 3), resized and cropped when ``image_size`` is given."""
    with Image.open(path) as image:
        if image_size is not None:
            # JPEG only (a no-op for other formats): decode at 1/2, 1/4 or 1/8 scale while both sides
            # stay >= image_size, several times faster for photos much larger than the network input.
            image.draft(None, (image_size, image_size))
        image = image.convert("L" if grey else "RGB")
    if image_size is not None:
        image = _resize_and_centre_crop(image, image_size)
    return np.array(image)  # a writable copy, which torch.from_numpy needs


class ImageFolderSplit(torch.utils.data.Dataset):
    """One split of an image folder: item i decodes ``paths[i]`` (see the module docstring)."""

    def __init__(self, paths: list[str], labels: np.ndarray, grey: bool, image_size: int | None,
                 shape: tuple[int, int, int], mean: np.ndarray, std: np.ndarray) -> None:
        self.paths = paths  # plain strings: cheap to pickle to worker processes
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.grey = grey
        self.image_size = image_size
        self.shape = shape  # (C, H, W) every item has
        self.mean = torch.from_numpy(mean).to(torch.float32)  # per channel, in [0, 1] pixel units
        self.std = torch.from_numpy(std).to(torch.float32)
        self._scale, self._shift = _standardising_affine(mean, std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.pixels(index)
        channels_first = torch.from_numpy(pixels).view(*pixels.shape[:2], -1).permute(2, 0, 1)
        x = channels_first.to(torch.float32, memory_format=torch.contiguous_format)
        return x.mul_(self._scale).add_(self._shift), self.labels[index].clone()

    def pixels(self, index: int) -> np.ndarray:
        """Item ``index``'s uint8 pixels, (H, W) or (H, W, 3), checked against the expected shape."""
        path = self.paths[index]
        try:
            pixels = _decode_image(path, self.grey, self.image_size)
        except Exception as exc:  # the file passed the scan, so it changed or is truncated
            raise ImageDecodeError(f"cannot decode image {path} ({type(exc).__name__}: {_one_line(exc)}); "
                                   f"it was changed or is truncated, replace or delete it") from exc
        if pixels.shape[:2] != self.shape[1:]:
            found, expected = pixels.shape[:2], self.shape[1:]
            raise ImageDecodeError(f"image {path} is now {found[1]}x{found[0]}, not {expected[1]}x{expected[0]} as "
                                   f"when the data set was loaded; it was changed, restart the run")
        return pixels


def _training_statistics(paths: list[str], grey: bool, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of at most STATS_SAMPLE_SIZE training images drawn with default_rng(STATS_SEED)."""
    rng = np.random.default_rng(STATS_SEED)
    # Sorted: reading in file order is kinder to disks; the sum does not depend on the order.
    sample = np.sort(rng.choice(len(paths), size=min(len(paths), STATS_SAMPLE_SIZE), replace=False))
    channels = 1 if grey else 3
    counts = np.zeros((channels, 256), dtype=np.int64)
    for index in sample:
        path = paths[index]
        try:
            pixels = _decode_image(path, grey, image_size).reshape(-1, channels)
        except Exception as exc:  # verify() does not decode JPEG data: a truncated one shows up here
            raise UserError(f"cannot decode image {path} ({type(exc).__name__}: {_one_line(exc)}); "
                            f"replace or delete it") from exc
        for channel in range(channels):
            counts[channel] += np.bincount(pixels[:, channel], minlength=256)
    return _stats_from_histograms(counts)


def load_imagefolder(path: str | Path, image_size: int | None) -> StreamedDataset:
    """``imagefolder:PATH``: a folder of class folders (optionally inside train/ and val/), decoded lazily.

    ``image_size`` resizes the shorter side to it and crops the centre square; without it all images
    must have one size. Every file is opened and verified now; see the module docstring.
    """
    root = Path(path).expanduser()
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive whole number of pixels, got {image_size!r}")
    if not root.is_dir():
        raise UserError(f"image folder {root} not found; imagefolder:PATH needs a folder with one sub-folder "
                        f"of images per class")
    classes, (train_files, train_labels), (test_files, test_labels) = _split_folder_files(root)
    headers = [_inspect_image(p) for p in (*train_files, *test_files)]
    grey = not any(h.colour for h in headers)
    if image_size is None:
        width, height = _check_one_size(root, headers)
    else:
        width = height = image_size
    shape = (1 if grey else 3, height, width)
    train_paths, test_paths = [str(p) for p in train_files], [str(p) for p in test_files]
    mean, std = _training_statistics(train_paths, grey, image_size)
    train = ImageFolderSplit(train_paths, train_labels, grey, image_size, shape, mean, std)
    test = ImageFolderSplit(test_paths, test_labels, grey, image_size, shape, mean, std)
    return StreamedDataset(name=f"{IMAGEFOLDER_PREFIX}{path}", train=train, test=test, num_classes=len(classes),
                           input_shape=shape, y_train=train.labels, y_test=test.labels, classes=classes)


def describe_imagefolder() -> DatasetInfo:
    """The generic ``imagefolder:PATH`` entry of ``localcredit datasets``."""
    return DatasetInfo(
        name=f"{IMAGEFOLDER_PREFIX}PATH", available=True, location="PATH (a folder of class folders)",
        how_to_get="put each class's images in PATH/CLASS/ (or PATH/train/CLASS/ and PATH/val/CLASS/)",
        description="your own images (png/jpg/jpeg/bmp/gif/webp), decoded on the fly: classes = sorted folder "
                    "names; without train/ and val/ a stratified sixth is the test split; grey unless any "
                    "image is colour; --image-size N resizes and centre-crops to NxN")


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
