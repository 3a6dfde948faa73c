"""``imagefolder:PATH`` (:func:`load_imagefolder`): a folder of class folders, streamed from disk.

One sub-folder per class (class names = sorted folder names; files in nested folders count for
their class folder; names starting with "." are skipped). If PATH has ``train/`` and ``val/``,
those are the splits; otherwise a fixed, stratified sixth of all images is held out as the test
split (``base.stratified_split(labels, round(N / 6), seed=0)``). Loading *scans* every file:
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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImagePalette

from ..errors import UserError
from .base import IMAGEFOLDER_PREFIX, DatasetInfo, stratified_split
from .streaming import ImageDecodeError, StreamedDataset, _one_line, _standardising_affine, _stats_from_histograms

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
    if palette is None or layout not in GREY_CHECKABLE_PALETTES or not isinstance(palette.palette, bytes):
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
    with Image.open(path) as opened:
        if image_size is not None:
            # JPEG only (a no-op for other formats): decode at 1/2, 1/4 or 1/8 scale while both sides
            # stay >= image_size, several times faster for photos much larger than the network input.
            opened.draft(None, (image_size, image_size))
        image = opened.convert("L" if grey else "RGB")
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
