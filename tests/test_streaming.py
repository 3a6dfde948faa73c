"""Streamed data sets: image folders and SVHN decode and batch right; every user mistake is a one-line UserError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localcredit.data import DatasetInfo, imagefolder, stratified_split, svhn
from localcredit.data.imagefolder import describe_imagefolder, load_imagefolder
from localcredit.data.streaming import StreamedDataset
from localcredit.data.svhn import describe_svhn, load_svhn
from localcredit.errors import UserError

scipy_io = pytest.importorskip("scipy.io")

CLASSES = ("cat", "ant", "bee")  # written in this order; loaded sorted
SIZE = (10, 12)  # PIL's (width, height)


# ------------------------------------------------------------------------------------------ helpers

def write_image(path: Path, size: tuple[int, int] = SIZE, colour: bool = False, seed: int = 0) -> np.ndarray:
    """A random PNG (or whatever the suffix says); returns its uint8 pixels, (H, W) or (H, W, 3)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, size=(height, width, 3) if colour else (height, width), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def write_classes(folder: Path, per_class: int, colour_every: int | None = 3, size=SIZE) -> None:
    """``per_class`` images in each of CLASSES; every ``colour_every``-th one in colour, the rest grey."""
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            colour = colour_every is not None and i % colour_every == 0
            write_image(folder / name / f"img{i:02d}.png", size=size, colour=colour, seed=100 * c + i)


@pytest.fixture
def flat(tmp_path) -> Path:
    root = tmp_path / "flat"
    write_classes(root, per_class=12)
    return root


@pytest.fixture
def split_layout(tmp_path) -> Path:
    root = tmp_path / "split"
    write_classes(root / "train", per_class=8)
    write_classes(root / "val", per_class=4)
    return root


def pixels_of(split, index: int) -> np.ndarray:
    """The item's pixels back in [0, 1], (C, H, W), by undoing the standardisation."""
    x, _ = split[index]
    return (x * split.std.view(-1, 1, 1) + split.mean.view(-1, 1, 1)).numpy()


def expected_pixels(path: str, channels: int) -> np.ndarray:
    """The file's pixels in [0, 1] as the data set should decode them, (C, H, W)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float64) / 255
    return array.reshape(*array.shape[:2], -1).transpose(2, 0, 1)


def all_items(split) -> tuple[torch.Tensor, torch.Tensor]:
    items = [split[i] for i in range(len(split))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    """Call ``fn``, expect a UserError whose single-line message contains ``match``; return the message."""
    with pytest.raises(UserError) as caught:
        fn(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    assert match in message, message
    return message


# -------------------------------------------------------------------------------------- imagefolder

def test_flat_layout_shapes_labels_and_class_order(flat):
    data = load_imagefolder(flat, None)
    assert isinstance(data, StreamedDataset)
    assert data.name == f"imagefolder:{flat}"
    assert data.classes == ["ant", "bee", "cat"]
    assert data.num_classes == 3
    assert data.input_shape == (3, 12, 10)  # colour because some images are; (C, H, W) from a 10x12 image
    # A sixth of 36 held out, stratified: 2 of each class's 12.
    assert (len(data.train), len(data.test)) == (30, 6)
    assert torch.bincount(data.y_train).tolist() == [10, 10, 10]
    assert torch.bincount(data.y_test).tolist() == [2, 2, 2]
    for split, labels in ((data.train, data.y_train), (data.test, data.y_test)):
        assert labels.dtype == torch.int64
        for i in range(len(split)):
            x, y = split[i]
            assert x.shape == (3, 12, 10) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and y.dim() == 0
            assert int(y) == int(labels[i])
            assert Path(split.paths[i]).parent.name == data.classes[int(y)]


def test_flat_split_is_the_documented_stratified_split(flat):
    data = load_imagefolder(flat, None)
    files = [flat / name / f"img{i:02d}.png" for name in sorted(CLASSES) for i in range(12)]
    labels = np.repeat(np.arange(3), 12)
    train, test = stratified_split(labels, 6, seed=0)
    assert data.train.paths == [str(files[i]) for i in train]
    assert data.test.paths == [str(files[i]) for i in test]
    assert data.y_train.tolist() == labels[train].tolist()


def test_train_val_layout(split_layout):
    data = load_imagefolder(split_layout, None)
    assert data.classes == ["ant", "bee", "cat"]
    assert (len(data.train), len(data.test)) == (24, 12)
    assert torch.bincount(data.y_test).tolist() == [4, 4, 4]
    assert all(Path(p).parts[-3] == "train" for p in data.train.paths)
    assert all(Path(p).parts[-3] == "val" for p in data.test.paths)
    assert data.y_train.tolist() == sorted(data.y_train.tolist())  # folder order, not shuffled


def test_pixels_decode_to_the_file_contents(flat):
    data = load_imagefolder(flat, None)
    for split in (data.train, data.test):
        for i in range(len(split)):
            np.testing.assert_allclose(pixels_of(split, i), expected_pixels(split.paths[i], 3), atol=1e-5)
    # A grey file in a colour data set becomes three equal channels.
    grey = next(i for i, p in enumerate(data.train.paths) if Image.open(p).mode == "L")
    channels = pixels_of(data.train, grey)
    np.testing.assert_allclose(channels[0], channels[1], atol=1e-5)
    np.testing.assert_allclose(channels[0], channels[2], atol=1e-5)


def test_all_grey_folder_has_one_channel(tmp_path):
    write_classes(tmp_path / "grey", per_class=6, colour_every=None)
    data = load_imagefolder(tmp_path / "grey", None)
    assert data.input_shape == (1, 12, 10)
    x, _ = data.train[0]
    assert x.shape == (1, 12, 10)
    np.testing.assert_allclose(pixels_of(data.train, 0), expected_pixels(data.train.paths[0], 1), atol=1e-5)


def test_training_split_is_standardised_with_its_statistics(flat):
    data = load_imagefolder(flat, None)
    x, _ = all_items(data.train)  # 30 images < 2000: the statistics use every one
    dims = (0, 2, 3)
    torch.testing.assert_close(x.mean(dim=dims), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=dims, correction=0), torch.ones(3), atol=1e-4, rtol=0)
    # The test split uses the training statistics, not its own.
    assert torch.equal(data.test.mean, data.train.mean) and torch.equal(data.test.std, data.train.std)


def test_statistics_come_from_a_seeded_sample_of_training_images(flat, monkeypatch):
    monkeypatch.setattr(imagefolder, "STATS_SAMPLE_SIZE", 5)
    data = load_imagefolder(flat, None)
    chosen = np.random.default_rng(imagefolder.STATS_SEED).choice(30, size=5, replace=False)
    sample = np.stack([expected_pixels(data.train.paths[i], 3) for i in chosen])
    np.testing.assert_allclose(data.train.mean.numpy(), sample.mean(axis=(0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(data.train.std.numpy(), sample.std(axis=(0, 2, 3)), atol=1e-6)
    assert torch.equal(load_imagefolder(flat, None).train.mean, data.train.mean)


def test_image_size_resizes_and_centre_crops_mixed_sizes(tmp_path):
    root = tmp_path / "mixed"
    write_classes(root, per_class=6)
    write_image(root / "ant" / "big.png", size=(30, 17), colour=True)
    data = load_imagefolder(root, 8)
    assert data.input_shape == (3, 8, 8)
    x, _ = all_items(data.train)
    assert x.shape == (len(data.train), 3, 8, 8)


def stripes(width: int, height: int) -> np.ndarray:
    """White in the middle half of the longer side, black in the outer quarters."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    if height > width:
        pixels[height // 4: 3 * height // 4] = 255
    else:
        pixels[:, width // 4: 3 * width // 4] = 255
    return pixels


def test_resize_keeps_the_centre_square(tmp_path):
    root = tmp_path / "stripes"
    for split in ("train", "val"):
        for name, (w, h) in (("tall", (20, 40)), ("wide", (40, 20))):
            for i in range(2):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(stripes(w, h)).save(root / split / name / f"{i}.png")
    data = load_imagefolder(root, 10)
    assert data.input_shape == (1, 10, 10)
    for split in (data.train, data.test):
        for i in range(len(split)):
            # 40 -> 20 long side; the centre 10 of 20 is the white middle half, blurred only at its edges.
            pixels = pixels_of(split, i)[0]
            inner = pixels[1:-1] if Path(split.paths[i]).parent.name == "tall" else pixels[:, 1:-1]
            assert inner.min() > 0.99 and pixels.min() > 0.5


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_exactly_the_requested_batches(flat, workers):
    data = load_imagefolder(flat, None)
    batches = [[5, 0, 3], [1], np.array([29, 2, 4])]
    got = list(data.loader("train", batches, workers=workers))
    assert len(got) == 3
    for (x, y), batch in zip(got, batches):
        expected_x, expected_y = zip(*(data.train[int(i)] for i in batch))
        assert x.shape == (len(batch), 3, 12, 10) and x.dtype == torch.float32
        assert y.shape == (len(batch),) and y.dtype == torch.int64
        torch.testing.assert_close(x, torch.stack(expected_x))
        assert torch.equal(y, torch.stack(expected_y))
        assert torch.equal(y, data.y_train[list(batch)])
    (x, y), = data.loader("test", [[0, 5]], workers=workers)
    assert torch.equal(y, data.y_test[[0, 5]])


def test_palette_images_count_as_grey_only_with_a_grey_palette(tmp_path):
    gradient = np.tile(np.arange(0, 250, 25, dtype=np.uint8), (12, 1))  # 12 x 10
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "grey" / split / name).mkdir(parents=True)
            Image.fromarray(gradient).convert("P").save(tmp_path / "grey" / split / name / "1.png")
            Image.fromarray(gradient).save(tmp_path / "grey" / split / name / "2.gif")
    assert load_imagefolder(tmp_path / "grey", None).input_shape == (1, 12, 10)
    colour = np.stack([gradient, gradient[:, ::-1], gradient], axis=-1)
    Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "grey" / "val" / "a" / "3.png")
    assert load_imagefolder(tmp_path / "grey", None).input_shape == (3, 12, 10)


def test_large_jpeg_is_decoded_at_reduced_scale_close_to_a_full_decode(tmp_path):
    rows, cols = np.mgrid[0:96, 0:128]
    smooth = np.stack([rows * 2, cols * 2, (rows + cols)], axis=-1).astype(np.uint8)  # 128 x 96, colour
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "jpeg" / split / name).mkdir(parents=True)
            Image.fromarray(smooth).save(tmp_path / "jpeg" / split / name / "1.jpg", quality=95)
    data = load_imagefolder(tmp_path / "jpeg", 16)
    assert data.input_shape == (3, 16, 16)
    with Image.open(data.train.paths[0]) as image:  # full decode, then the same resize and crop
        reference = image.convert("RGB").resize((21, 16), Image.Resampling.BILINEAR).crop((2, 0, 18, 16))
    expected = np.asarray(reference, dtype=np.float64).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(pixels_of(data.train, 0), expected, atol=0.05)


def test_loader_rejects_bad_batches(flat):
    data = load_imagefolder(flat, None)
    with pytest.raises(ValueError, match="outside"):
        data.loader("train", [[0, 30]], workers=0)
    with pytest.raises(ValueError, match="outside"):
        data.loader("train", [[-1]], workers=0)
    with pytest.raises(ValueError, match="empty"):
        data.loader("train", [[0], []], workers=0)
    with pytest.raises(ValueError, match="split"):
        data.loader("val", [[0]], workers=0)


def test_hidden_files_and_folders_are_ignored(flat):
    (flat / "ant" / "._img00.png").write_bytes(b"AppleDouble resource fork, not a PNG")
    write_image(flat / ".ipynb_checkpoints" / "x.png")
    write_image(flat / "bee" / ".cache" / "y.png")
    data = load_imagefolder(flat, None)
    assert data.classes == ["ant", "bee", "cat"]
    assert len(data.train) + len(data.test) == 36


def test_nested_and_upper_case_files_count_for_their_class(flat):
    write_image(flat / "ant" / "more" / "extra.PNG")
    data = load_imagefolder(flat, None)
    assert len(data.train) + len(data.test) == 37


@pytest.mark.parametrize("workers", [0, 2])
def test_file_broken_after_loading_is_a_one_line_error_while_training(flat, workers):
    data = load_imagefolder(flat, None)
    broken = data.train.paths[1]
    Path(broken).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    loader = data.loader("train", [[0], [1]], workers=workers)
    raises_one_line(broken, list, loader)


# ---------------------------------------------------------------------------------- imagefolder errors

def test_missing_folder(tmp_path):
    raises_one_line(str(tmp_path / "nowhere"), load_imagefolder, tmp_path / "nowhere", None)


def test_no_class_folders(tmp_path):
    write_image(tmp_path / "loose" / "a.png")
    raises_one_line(str(tmp_path / "loose"), load_imagefolder, tmp_path / "loose", None)


def test_empty_class_folder(flat):
    (flat / "dog").mkdir()
    (flat / "dog" / "notes.txt").write_text("not an image")
    raises_one_line(str(flat / "dog"), load_imagefolder, flat, None)


def test_empty_class_folder_in_val(split_layout):
    for f in (split_layout / "val" / "bee").iterdir():
        f.unlink()
    raises_one_line(str(split_layout / "val" / "bee"), load_imagefolder, split_layout, None)


def test_corrupt_png(flat):
    bad = flat / "bee" / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    raises_one_line(str(bad), load_imagefolder, flat, None)


def test_png_with_a_bad_checksum_is_found_by_verify(flat):
    good = flat / "bee" / "img03.png"
    raw = bytearray(good.read_bytes())
    raw[-20] ^= 0xFF  # inside the image data: Image.open alone would not notice
    good.write_bytes(bytes(raw))
    raises_one_line(str(good), load_imagefolder, flat, None)


def test_mixed_sizes_need_image_size(flat):
    write_image(flat / "cat" / "odd.png", size=(11, 12))
    message = raises_one_line("--image-size", load_imagefolder, flat, None)
    assert str(flat / "cat" / "odd.png") in message
    assert load_imagefolder(flat, 9).input_shape == (3, 9, 9)


def test_train_val_class_mismatch(split_layout):
    (split_layout / "val" / "ant").rename(split_layout / "val" / "aardvark")
    message = raises_one_line(str(split_layout), load_imagefolder, split_layout, None)
    assert "ant" in message and "aardvark" in message


def test_train_without_val(tmp_path):
    write_classes(tmp_path / "half" / "train", per_class=2)
    raises_one_line("val/", load_imagefolder, tmp_path / "half", None)


def test_too_few_images_to_hold_out_a_test_split(tmp_path):
    write_image(tmp_path / "tiny" / "a" / "1.png")
    write_image(tmp_path / "tiny" / "b" / "1.png")
    raises_one_line(str(tmp_path / "tiny"), load_imagefolder, tmp_path / "tiny", None)


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_bad_image_size(flat, size):
    raises_one_line("image size", load_imagefolder, flat, size)


def test_describe_imagefolder():
    info = describe_imagefolder()
    assert isinstance(info, DatasetInfo)
    assert info.name == "imagefolder:PATH" and info.available


# --------------------------------------------------------------------------------------------- svhn

def svhn_arrays(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Official layout: X uint8 (32, 32, 3, N), y uint8 (N, 1) in 1..10 (10 = digit 0), every label present."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)
    y = (np.arange(count) % 10 + 1).astype(np.uint8).reshape(-1, 1)
    return x, rng.permutation(y)


def write_svhn(folder: Path, train: int = 20, test: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": svhn_arrays(train, 1), "test": svhn_arrays(test, 2)}
    for split, (x, y) in arrays.items():
        scipy_io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return arrays


@pytest.fixture
def svhn_folder(tmp_path) -> tuple[Path, dict]:
    folder = tmp_path / "svhn"
    return folder, write_svhn(folder)


def test_svhn_loads_the_official_layout(svhn_folder):
    folder, arrays = svhn_folder
    data = load_svhn(folder)
    assert data.name == "svhn" and data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert data.classes == [str(d) for d in range(10)]
    for split, labels, key in ((data.train, data.y_train, "train"), (data.test, data.y_test, "test")):
        x_file, y_file = arrays[key]
        assert len(split) == x_file.shape[3]
        assert labels.dtype == torch.int64
        assert labels.tolist() == [int(v) % 10 for v in y_file[:, 0]]  # label 10 is digit 0
        for i in (0, 3, len(split) - 1):
            x, y = split[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dim() == 0
            unstandardised = (x * split.std.view(-1, 1, 1) + split.mean.view(-1, 1, 1)).numpy()
            # X[row, column, channel, image]
            np.testing.assert_allclose(unstandardised, x_file[:, :, :, i].transpose(2, 0, 1) / 255, atol=1e-5)
    assert 0 in data.y_train.tolist()


def test_svhn_training_split_is_standardised(svhn_folder):
    data = load_svhn(svhn_folder[0])
    x, _ = data.train.batch(range(len(data.train)))
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    assert torch.equal(data.test.mean, data.train.mean)


def test_svhn_getitems_equals_items(svhn_folder):
    data = load_svhn(svhn_folder[0])
    indices = [7, 0, 19, 7]
    batch = data.train.__getitems__(indices)
    assert len(batch) == len(indices)
    for (x, y), i in zip(batch, indices):
        expected_x, expected_y = data.train[i]
        assert torch.equal(x, expected_x) and torch.equal(y, expected_y)


@pytest.mark.parametrize("workers", [0, 2])
def test_svhn_loader_batches(svhn_folder, workers):
    data = load_svhn(svhn_folder[0])
    batches = [[3, 1, 4, 1, 5], [9], [2, 6]]
    got = list(data.loader("train", batches, workers=workers))
    assert len(got) == 3
    for (x, y), batch in zip(got, batches):
        assert x.shape == (len(batch), 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (len(batch),) and y.dtype == torch.int64
        expected_x, expected_y = data.train.batch(batch)
        assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    (x, y), = data.loader("test", [[0, 9]], workers=workers)
    assert torch.equal(y, data.y_test[[0, 9]])


def test_svhn_loader_fetches_whole_batches_through_getitems(svhn_folder, monkeypatch):
    data = load_svhn(svhn_folder[0])
    calls = []
    original = svhn.SVHNSplit.__getitems__

    def spy(self, indices):
        calls.append(list(indices))
        return original(self, indices)

    def no_single_items(self, index):
        raise AssertionError("the DataLoader should not fetch sample by sample")

    monkeypatch.setattr(svhn.SVHNSplit, "__getitems__", spy)
    monkeypatch.setattr(svhn.SVHNSplit, "__getitem__", no_single_items)
    got = list(data.loader("train", [[4, 2, 0], [1]], workers=0))
    assert calls == [[4, 2, 0], [1]]
    assert [tuple(x.shape) for x, _ in got] == [(3, 3, 32, 32), (1, 3, 32, 32)]


def test_svhn_works_with_a_plain_dataloader(svhn_folder):
    data = load_svhn(svhn_folder[0])
    x, y = next(iter(torch.utils.data.DataLoader(data.test, batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and torch.equal(y, data.y_test[:4])


def test_svhn_default_root_and_description(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALCREDIT_DATA", str(tmp_path))
    info = describe_svhn()
    assert info.name == "svhn" and not info.available and info.location == str(tmp_path / "svhn")
    raises_one_line(str(tmp_path / "svhn" / "train_32x32.mat"), load_svhn, None)
    write_svhn(tmp_path / "svhn")
    assert describe_svhn().available
    assert len(load_svhn(None).train) == 20


def test_svhn_missing_test_file(svhn_folder):
    folder, _ = svhn_folder
    (folder / "test_32x32.mat").unlink()
    message = raises_one_line(str(folder / "test_32x32.mat"), load_svhn, folder)
    assert "train_32x32.mat and test_32x32.mat" in message


def rewrite(folder: Path, **contents) -> Path:
    path = folder / "train_32x32.mat"
    scipy_io.savemat(path, contents)
    return path


@pytest.mark.parametrize("case", ["random bytes", "no X", "no y", "grey X", "float X", "label 0", "label 11",
                                  "fractional label", "too few labels"])
def test_svhn_malformed_files(svhn_folder, case):
    folder, arrays = svhn_folder
    x, y = arrays["train"]
    path = folder / "train_32x32.mat"
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif case == "no X":
        rewrite(folder, y=y)
    elif case == "no y":
        rewrite(folder, X=x)
    elif case == "grey X":
        rewrite(folder, X=x[:, :, :1], y=y)
    elif case == "float X":
        rewrite(folder, X=x.astype(np.float32), y=y)
    elif case == "label 0":
        rewrite(folder, X=x, y=np.where(y == 10, 0, y))
    elif case == "label 11":
        rewrite(folder, X=x, y=np.where(y == 10, 11, y))
    elif case == "fractional label":
        rewrite(folder, X=x, y=y.astype(np.float64) + 0.5)
    elif case == "too few labels":
        rewrite(folder, X=x, y=y[:-1])
    message = raises_one_line(str(path), load_svhn, folder)
    assert "official" in message


# ----- streamed data through `localcredit train` ------------------------------------------------
def write_fashion_folder(root: Path, fashion, classes=(0, 1, 7), per_class=150) -> None:
    """Real Fashion-MNIST images (T-shirt, trouser, sneaker) as PNG files, one folder per class."""
    images = ((fashion.x_train - fashion.x_train.min()) / (fashion.x_train.max() - fashion.x_train.min()) * 255)
    for c in classes:
        folder = root / f"class-{c}"
        folder.mkdir(parents=True)
        for i, index in enumerate((fashion.y_train == c).nonzero().flatten()[:per_class].tolist()):
            Image.fromarray(images[index, 0].round().byte().numpy(), mode="L").save(folder / f"{i}.png")


def test_train_streams_an_image_folder_and_learns(fashion, tmp_path, capsys):
    from localcredit.cli import main

    write_fashion_folder(tmp_path / "pngs", fashion)
    out = tmp_path / "out"
    assert main(["train", "--rule", "bp", "--data", f"imagefolder:{tmp_path / 'pngs'}", "--image-size", "16",
                 "--arch", "vgg", "--channels", "8,M,16,M", "--hidden", "32", "--epochs", "3", "--batch-size", "16",
                 "--augment", "flip", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["train_samples"] == 375 and result["status"] == "ok"
    assert result["test_accuracy"] >= 0.8, result["test_accuracy_per_epoch"]  # 3 classes: chance is 0.33
    assert main(["align", "--rule", "fa", "--data", f"imagefolder:{tmp_path / 'pngs'}", "--image-size", "16",
                 "--arch", "vgg", "--channels", "8,M", "--hidden", "16", "--batch-size", "16"]) == 0


def test_train_streams_svhn(tmp_path, monkeypatch, capsys):
    from localcredit.cli import main

    write_svhn(tmp_path / "svhn", train=64, test=32)
    out = tmp_path / "out"
    assert main(["train", "--rule", "dfa", "--data", "svhn", "--data-root", str(tmp_path / "svhn"), "--arch", "vgg",
                 "--channels", "4,M", "--hidden", "8", "--epochs", "1", "--batch-size", "16", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "result.json").read_text())["train_samples"] == 64


@pytest.mark.parametrize("argv,expect", [
    (["--procs", "2"], "fits in memory"),
])
def test_streamed_data_refuses_what_needs_memory(fashion, tmp_path, capsys, argv, expect):
    from localcredit.cli import main

    write_fashion_folder(tmp_path / "pngs", fashion, per_class=12)
    code = main(["train", "--rule", "bp", "--data", f"imagefolder:{tmp_path / 'pngs'}", *argv,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_broken_image_folder_exits_2_and_writes_nothing(tmp_path, capsys):
    from localcredit.cli import main

    (tmp_path / "pngs" / "cat").mkdir(parents=True)
    (tmp_path / "pngs" / "dog").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "pngs" / "cat" / "a.png")
    code = main(["train", "--rule", "bp", "--data", f"imagefolder:{tmp_path / 'pngs'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dog" in err[0], err
    assert not (tmp_path / "out").exists()
