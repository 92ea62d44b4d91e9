"""Tests for leanprop.data: augmentation, sharding, every dataset kind, transforms and the real JPEG data.

Nothing here writes into the user's home: an autouse fixture points LEANPROP_CACHE at a tmp folder.
The real-data test decodes the shared CIFAR-10 JPEG archive once per session (about 5-10 s) into a tmp
cache; set LEANPROP_TEST_CACHE=DIR to keep that cache between runs (the test then only checks it).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leanprop.config import DataConfig
from leanprop.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FileLoader,
    TensorLoader,
    build_data,
    cache_dir,
    resolve_data_root,
    val_partition,
)
from leanprop.data import cifar as cifar_mod
from leanprop.data.augment import Normalize, PadCropFlip, channel_stats, crop_flip_params
from leanprop.data.cifar_jpeg import find_jpeg_files, iter_tar_files, load_cifar10_jpeg
from leanprop.data.loaders import eval_shard, train_shard
from leanprop.data.transforms import (
    CenterCrop,
    RandomResizedCrop,
    ResizeShorter,
    ToNormalizedTensor,
    imagenet_eval_transform,
    random_resized_crop_box,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANPROP_CACHE", str(tmp_path / "cache"))


def _collect(loader):
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------ augmentation


def _naive_crop_flip(images: np.ndarray, idx, dy, dx, flip, pad: int) -> np.ndarray:
    """Reference: pad each image with zeros, cut the window, flip — one sample at a time."""
    _, h, w, _ = images.shape
    out = []
    for i, y0, x0, f in zip(idx.tolist(), dy.tolist(), dx.tolist(), flip.tolist(), strict=True):
        p = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
        win = p[y0:y0 + h, x0:x0 + w]
        out.append(win[:, ::-1] if f else win)
    return np.stack(out)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_pad_crop_flip_matches_per_sample_loop(channels):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (12, 7, 9, channels), dtype=np.uint8)  # non-square catches h/w mix-ups
    crop = PadCropFlip(torch.from_numpy(images), pad=4)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 12, (30,), generator=g)
    dy, dx, flip = crop_flip_params(30, 4, g)
    got = crop(idx, dy, dx, flip).numpy()
    assert got.shape == (30, 7, 9, channels)
    np.testing.assert_array_equal(got, _naive_crop_flip(images, idx, dy, dx, flip, 4))
    assert flip.any() and (~flip).any() and dy.min() >= 0 and dy.max() <= 8


def test_flip_and_zero_padding():
    images = torch.arange(2 * 4 * 5 * 3, dtype=torch.uint8).view(2, 4, 5, 3)
    crop = PadCropFlip(images, pad=2)
    idx = torch.tensor([0, 1, 1])
    out = crop(idx, torch.tensor([2, 2, 0]), torch.tensor([2, 2, 0]), torch.tensor([False, True, False]))
    assert torch.equal(out[0], images[0])
    assert torch.equal(out[1], images[1].flip(1))  # flip = reversed columns
    assert (out[2, :2] == 0).all() and (out[2, :, :2] == 0).all()  # offset 0: top/left come from padding
    assert torch.equal(out[2, 2:, 2:], images[1, :2, :3])


def test_normalize_output():
    x = torch.randint(0, 256, (4, 6, 5, 3), dtype=torch.uint8)
    out = Normalize(CIFAR10_MEAN, CIFAR10_STD)(x)
    assert out.shape == (4, 3, 6, 5) and out.dtype == torch.float32 and out.is_contiguous()
    ref = (x.permute(0, 3, 1, 2).double() / 255 - torch.tensor(CIFAR10_MEAN).double().view(1, 3, 1, 1)) \
        / torch.tensor(CIFAR10_STD).double().view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_channel_stats():
    x = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 2), dtype=np.uint8)
    mean, std = channel_stats(x, chunk=7)
    np.testing.assert_allclose(mean, x.reshape(-1, 2).mean(0) / 255, rtol=1e-9)
    np.testing.assert_allclose(std, x.reshape(-1, 2).std(0) / 255, rtol=1e-9)


def _loader(n=50, seed=0, rank=0, world=1, bs=8, augment=True, train=True):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    return TensorLoader(x, y, bs, mean=(0.5,) * 3, std=(0.25,) * 3, train=train, augment=augment, seed=seed,
                        rank=rank, world_size=world)


def test_augmented_loader_deterministic_and_epoch_dependent():
    a, b = _loader(), _loader()
    for epoch in range(3):  # b skips epochs 0-1, like a run resumed at epoch 2
        a.set_epoch(epoch)
        xa, ya = _collect(a)
    torch.manual_seed(999)  # the global RNG must not matter, nor be consumed
    state = torch.get_rng_state()
    b.set_epoch(2)
    xb, yb = _collect(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(state, torch.get_rng_state())
    b.set_epoch(3)
    xc, _ = _collect(b)
    assert not torch.equal(xa, xc)
    other_seed = _loader(seed=1)
    other_seed.set_epoch(2)
    assert not torch.equal(_collect(other_seed)[0], xa)
    # output format
    x, y = next(iter(a))
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64


def test_loader_samples_are_crops_of_the_right_images():
    loader = _loader(n=20, bs=6)
    loader.set_epoch(4)
    x, y = _collect(loader)
    idx = loader.indices()
    assert torch.equal(y, torch.as_tensor(np.arange(20) % 10)[idx])
    dy, dx, flip = crop_flip_params(len(idx), 4, loader.augment_generator())
    ref = _naive_crop_flip(loader.images.numpy(), idx, dy, dx, flip, 4)
    torch.testing.assert_close(x, loader.normalize(torch.from_numpy(ref)))


def test_no_augment_and_eval_are_plain():
    loader = _loader(n=13, augment=False, train=False, bs=5)
    x, y = _collect(loader)
    assert len(loader) == 3 and x.shape[0] == 13
    torch.testing.assert_close(x, loader.normalize(loader.images))


# ----------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 3), (11, 2), (2, 5), (7, 7)])
def test_train_shard_matches_distributed_sampler(n, world):
    ds = list(range(n))
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            ref = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=5)
            ref.set_epoch(epoch)
            ours = train_shard(n, 5, epoch, rank, world).tolist()
            assert ours == list(ref)
            shards.append(ours)
        # together the ranks cover the padded permutation exactly once
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        total = -(-n // world) * world
        padded = (perm * (total // n + 1))[:total]
        merged = [shards[i % world][i // world] for i in range(total)]
        assert merged == padded


def test_eval_shards_disjoint_and_complete():
    n, world = 23, 4
    shards = [eval_shard(n, r, world).tolist() for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))
    loaders = [_loader(n=n, rank=r, world=world, train=False, bs=4) for r in range(world)]
    assert sum(ld.num_samples for ld in loaders) == n
    counts = [sum(len(y) for _, y in ld) for ld in loaders]
    assert counts == [6, 6, 6, 5] and [len(ld) for ld in loaders] == [2, 2, 2, 2]


def test_train_len_with_partial_last_batch():
    loaders = [_loader(n=11, rank=r, world=2, bs=4) for r in range(2)]
    for ld in loaders:
        assert ld.num_samples == 6 and len(ld) == 2 and ld.dataset_size == 11
        sizes = [len(y) for _, y in ld]
        assert sizes == [4, 2]
    single = _loader(n=11, bs=4)
    assert len(single) == 3 and [len(y) for _, y in single] == [4, 4, 3]


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        _loader(rank=2, world=2)


# ------------------------------------------------------------------------------------------ npz datasets


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return DataConfig(name="npz", path=str(path), batch_size=4, eval_batch_size=5, augment=False)


@pytest.mark.parametrize("gray", [False, True])
def test_npz_roundtrip(tmp_path, gray):
    rng = np.random.default_rng(0)
    shape = (10, 6, 6) if gray else (10, 6, 6, 3)
    x_train = rng.integers(0, 256, shape, dtype=np.uint8)
    x_test = rng.integers(0, 256, (7, *shape[1:]), dtype=np.uint8)
    y_train = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    y_test = np.array([4, 0, 1, 2, 3, 0, 1], dtype=np.uint8)
    cfg = _write_npz(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    b = build_data(cfg)
    assert b.num_classes == 5 and b.image_size == 6 and b.in_channels == (1 if gray else 3)
    assert isinstance(b.train, TensorLoader) and b.val is None
    x, y = _collect(b.test)
    assert torch.equal(y, torch.as_tensor(y_test, dtype=torch.int64))
    xt = x_train[..., None] if gray else x_train
    mean = xt.reshape(-1, xt.shape[-1]).mean(0) / 255
    std = xt.reshape(-1, xt.shape[-1]).std(0) / 255
    expect = (x_test.reshape(x.shape[0], 6, 6, -1) / 255 - mean) / std
    expect = torch.from_numpy(expect.transpose(0, 3, 1, 2)).float()
    torch.testing.assert_close(x, expect, atol=1e-4, rtol=1e-4)
    # training images normalised with the training statistics: mean ~0, std ~1 per channel
    xtr, _ = _collect(b.train)
    torch.testing.assert_close(xtr.mean((0, 2, 3)), torch.zeros(xtr.shape[1]), atol=1e-4, rtol=0)
    assert "npz file" in b.description and "10 train / 7 test" in b.description


@pytest.mark.parametrize(("change", "pattern"), [
    ({"x_train": np.zeros((4, 3, 8, 8), np.float32)},
     r"x_train must be uint8 NHWC or NHW, got float32 \(4, 3, 8, 8\)"),
    ({"y_train": np.zeros(3, np.int64)}, r"y_train has 3 labels but x_train has 4 images"),
    ({"x_test": np.zeros((2, 8), np.uint8)}, r"x_test must be uint8 NHWC or NHW.*3 or 4 dimensions"),
    ({"x_train": np.zeros((4, 3, 8, 8), np.uint8)}, r"looks like NCHW"),
    ({"y_test": np.array([0, -1])}, r"negative labels"),
    ({"y_test": np.array([0.0, 1.0])}, r"integer array"),
    ({"x_test": np.zeros((2, 9, 8, 3), np.uint8)}, r"x_test images are"),
])
def test_npz_bad_inputs(tmp_path, change, pattern):
    arrays = {"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.zeros(4, np.int64),
              "x_test": np.zeros((2, 8, 8, 3), np.uint8), "y_test": np.zeros(2, np.int64)}
    arrays.update(change)
    cfg = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=pattern):
        build_data(cfg)


def test_npz_missing_key_and_file(tmp_path):
    cfg = _write_npz(tmp_path / "m.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="lacks x_test, y_test"):
        build_data(cfg)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        build_data(DataConfig(name="npz", path=str(tmp_path / "nope.npz")))


# -------------------------------------------------------------------------------------- image folders


def _png_tree(root: Path, splits: dict[str, dict[str, int]], size=(8, 6), mode="RGB", fmt="png") -> dict:
    """Write root/<split>/<class>/<i>.<fmt>; returns {path: array} of what was written."""
    rng = np.random.default_rng(0)
    written = {}
    for split, classes in splits.items():
        for cls, count in classes.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                p = d / f"{i:02d}.{fmt}"
                Image.fromarray(a, mode).save(p)
                written[str(p)] = a
    return written


def test_folder_small_images_in_memory(tmp_path):
    root = tmp_path / "imgs"
    written = _png_tree(root, {"train": {"zebra": 3, "ant": 2}, "val": {"ant": 1, "zebra": 2}})
    cfg = DataConfig(name="folder", path=str(root), batch_size=4, eval_batch_size=10, augment=False)
    b = build_data(cfg, progress=False)
    assert b.classes == ["ant", "zebra"] and b.num_classes == 2
    assert b.image_size == 6 and b.in_channels == 3 and isinstance(b.train, TensorLoader)
    assert torch.equal(b.train.labels, torch.tensor([0, 0, 1, 1, 1]))
    assert torch.equal(b.test.labels, torch.tensor([0, 1, 1]))
    expect = np.stack([written[str(root / "val" / c / f"{i:02d}.png")] for c, i in
                       [("ant", 0), ("zebra", 0), ("zebra", 1)]])
    assert torch.equal(b.test.images, torch.from_numpy(expect))
    assert "decoded into memory" in b.description
    assert any(p.name.startswith("folder_") for p in cache_dir().iterdir())
    again = build_data(cfg, progress=False)  # second time: from the cache
    assert "loaded from cache" in again.description
    assert torch.equal(again.test.images, b.test.images)


def test_folder_grayscale(tmp_path):
    root = tmp_path / "g"
    _png_tree(root, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, size=(5, 5), mode="L")
    b = build_data(DataConfig(name="folder", path=str(root), batch_size=2), progress=False)
    assert b.in_channels == 1
    x, _ = next(iter(b.train))
    assert x.shape == (2, 1, 5, 5)


def test_folder_errors(tmp_path):
    root = tmp_path / "f"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data(DataConfig(name="folder", path=str(root)))
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=str(root / "train")):
        build_data(DataConfig(name="folder", path=str(root)))
    _png_tree(root, {"train": {"a": 1}})
    with pytest.raises(FileNotFoundError, match=f"{root / 'test'} or {root / 'val'}"):
        build_data(DataConfig(name="folder", path=str(root)))
    (root / "test" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"class folder .*a contains no images"):
        build_data(DataConfig(name="folder", path=str(root)))
    Image.new("RGB", (4, 4)).save(root / "test" / "a" / "x.png")
    (root / "test" / "stranger").mkdir()
    Image.new("RGB", (4, 4)).save(root / "test" / "stranger" / "x.png")
    with pytest.raises(ValueError, match="stranger"):
        build_data(DataConfig(name="folder", path=str(root)))
    flat = tmp_path / "flat"
    (flat / "test" / "a").mkdir(parents=True)
    (flat / "train").mkdir()
    Image.new("RGB", (4, 4)).save(flat / "train" / "loose.png")
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        build_data(DataConfig(name="folder", path=str(flat)))


def test_imagenet_style_streaming(tmp_path):
    root = tmp_path / "inet"
    _png_tree(root, {"train": {"n01": 3, "n02": 3}, "val": {"n01": 2, "n02": 1}}, size=(90, 70), fmt="JPEG")
    cfg = DataConfig(name="imagenet", path=str(root), batch_size=4, eval_batch_size=2, image_size=32,
                     resize_size=36)
    b = build_data(cfg, seed=3, progress=False)
    assert isinstance(b.train, FileLoader) and b.num_classes == 2 and b.image_size == 32
    assert len(b.train) == 2 and len(b.test) == 2
    b.train.set_epoch(1)
    x, y = _collect(b.train)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, yt = _collect(b.test)
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == [0, 0, 1]
    # per-sample seeds: the same batches with worker processes, and the same again after other epochs
    cfg.workers = 1
    b2 = build_data(cfg, seed=3, progress=False)
    b2.train.set_epoch(0)
    _collect(b2.train)
    b2.train.set_epoch(1)
    state = torch.get_rng_state()
    x2, y2 = _collect(b2.train)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(state, torch.get_rng_state())  # the DataLoader does not draw from the global RNG
    b2.train.set_epoch(2)
    assert not torch.equal(_collect(b2.train)[0], x)
    # large images in a plain folder take the same streaming path
    cfg_folder = DataConfig(name="folder", path=str(root), batch_size=4, image_size=32, resize_size=36)
    assert isinstance(build_data(cfg_folder, progress=False).train, FileLoader)


# --------------------------------------------------------------------------------------- CIFAR pickles


def _fake_cifar(root: Path, name: str = "cifar10", per_batch: int = 4) -> np.ndarray:
    """A tiny copy of the python-pickle layout; returns the HWC images in order (train then test)."""
    spec = cifar_mod.ARCHIVES[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i, fname in enumerate(spec["train"] + spec["test"]):
        hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        images.append(hwc)
        rows = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # planar R, G, B rows
        labels = [(i + k) % 10 for k in range(per_batch)]
        with open(folder / fname, "wb") as f:
            pickle.dump({b"data": rows, spec["labels_key"]: labels, b"batch_label": b"x"}, f)
    return np.concatenate(images)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    images = _fake_cifar(tmp_path, name)
    n_train = 4 * len(cifar_mod.ARCHIVES[name]["train"])
    b = build_data(DataConfig(name=name, root=str(tmp_path), source="auto", augment=False, batch_size=64))
    assert b.num_classes == (10 if name == "cifar10" else 100) and b.image_size == 32 and b.in_channels == 3
    assert b.train.dataset_size == n_train and b.test.dataset_size == 4
    assert torch.equal(b.train.images, torch.from_numpy(images[:n_train]))
    assert torch.equal(b.test.images, torch.from_numpy(images[n_train:]))
    assert b.test.labels.tolist() == [(len(cifar_mod.ARCHIVES[name]["train"]) + k) % 10 for k in range(4)]
    assert "python pickles" in b.description


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_data(DataConfig(name="cifar10", root=str(tmp_path / "empty")))
    msg = str(e.value)
    for needle in ("cifar-10-batches-py", "CIFAR-10-images-jpeg.tar.gz", "cifar10_labels_original_order.npz",
                   "LEANPROP_DATA", "--data-dir", "data.download=true"):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="only for cifar10"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path), source="jpeg"))


def test_cifar_download(tmp_path, monkeypatch):
    src = tmp_path / "src"
    images = _fake_cifar(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = dict(cifar_mod.ARCHIVES["cifar10"], url=archive.as_uri(), md5="0" * 32)
    monkeypatch.setitem(cifar_mod.ARCHIVES, "cifar10", spec)
    root = tmp_path / "data"
    cfg = DataConfig(name="cifar10", root=str(root), download=True, source="pickle")
    with pytest.raises(FileNotFoundError, match="corrupt"):
        build_data(cfg, progress=False)
    spec["md5"] = md5
    b = build_data(cfg, progress=False)
    assert torch.equal(b.train.images, torch.from_numpy(images[:20]))
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # no temporary files left behind
    spec["url"] = (tmp_path / "offline.tar.gz").as_uri()
    with pytest.raises(FileNotFoundError, match="failed") as e:
        build_data(DataConfig(name="cifar10", root=str(tmp_path / "other"), download=True), progress=False)
    assert "cifar-10-batches-py" in str(e.value) and "LEANPROP_DATA" in str(e.value)


# ------------------------------------------------------------------------------------ synthetic, splits


def test_synthetic_is_deterministic_and_learnable():
    cfg = DataConfig(name="synthetic", synthetic_train=400, synthetic_test=100, synthetic_classes=4,
                     synthetic_size=12, augment=False)
    a, b = build_data(cfg, seed=0), build_data(cfg, seed=7)
    assert torch.equal(a.train.images, b.train.images) and "SYNTHETIC" in a.description
    assert a.num_classes == 4 and a.image_size == 12
    x, y = a.train.images.float(), a.train.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(4)])
    xt = a.test.images.float()
    pred = ((xt[:, None] - centroids[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert (pred == a.test.labels).float().mean() > 0.9


def test_val_split_and_limits():
    cfg = DataConfig(name="synthetic", synthetic_train=100, synthetic_test=30, val_split=20, augment=False)
    a, b = build_data(cfg, seed=0), build_data(cfg, seed=9)
    train_idx, val_idx = val_partition(100, 20)
    assert len(set(train_idx) | set(val_idx)) == 100 and not set(train_idx) & set(val_idx)
    assert a.train.dataset_size == 80 and a.val.dataset_size == 20
    assert torch.equal(a.val.images, b.val.images)  # the hold-out does not depend on the run seed
    full = build_data(DataConfig(name="synthetic", synthetic_train=100, synthetic_test=30), seed=0)
    assert torch.equal(a.val.images, full.train.images[torch.from_numpy(val_idx)])
    assert "80 train / 20 val / 30 test" in a.description
    cfg.limit_train, cfg.limit_eval = 10, 5
    c = build_data(cfg)
    assert (c.train.dataset_size, c.val.dataset_size, c.test.dataset_size) == (10, 5, 5)
    assert torch.equal(c.train.images, full.train.images[torch.from_numpy(train_idx[:10])])
    cfg.val_split = 100
    with pytest.raises(ValueError, match="val_split"):
        build_data(cfg)


def test_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANPROP_DATA", str(tmp_path / "d"))
    assert resolve_data_root("x/y") == Path("x/y")
    assert resolve_data_root(None) == tmp_path / "d"
    monkeypatch.delenv("LEANPROP_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(None) == tmp_path / "xdg" / "leanprop" / "data"
    monkeypatch.delenv("LEANPROP_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "leanprop"
    monkeypatch.setenv("LEANPROP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_tar_walker_matches_tarfile():
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        names = ["train/cat/0000.jpg", "test/dog/0001.jpg", "d" * 60 + "/" + "e" * 70 + ".jpg"]
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for i, n in enumerate(names):
                data = bytes([i]) * (100 + 600 * i)
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        got = [(n, bytes(d)) for n, d in iter_tar_files(buf.getvalue())]
        assert got == [(n, bytes([i]) * (100 + 600 * i)) for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------ PIL transforms


def test_random_resized_crop_box_inside_image():
    rng = random.Random(0)
    for width, height in [(50, 40), (7, 300), (300, 7), (1, 1), (224, 224)]:
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 < w <= width and 0 < h <= height
            assert 0 <= left <= width - w and 0 <= top <= height - h
    # no draw fits a 100x10 strip: the fallback is the centred crop at the widest allowed ratio
    assert random_resized_crop_box(100, 10, (0.5, 1.0), (3 / 4, 4 / 3), rng) == (43, 0, 13, 10)
    assert random_resized_crop_box(40, 30, (1.0, 1.0), (4 / 3, 4 / 3), rng) == (0, 0, 40, 30)


def test_random_resized_crop_output_and_region():
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :, 0] = np.arange(60)[None] * 4  # red encodes the column
    img = Image.fromarray(a)
    out = RandomResizedCrop(16)(img, random.Random(1))
    assert out.size == (16, 16)
    rng = random.Random(1)
    left, top, w, h = random_resized_crop_box(60, 40, (0.08, 1.0), (3 / 4, 4 / 3), rng)
    red = np.asarray(out)[:, :, 0].astype(int)
    assert red.min() >= 4 * left - 4 and red.max() <= 4 * (left + w - 1) + 4  # only columns of the box


def test_resize_and_center_crop():
    assert ResizeShorter(10)(Image.new("RGB", (40, 20))).size == (20, 10)
    assert ResizeShorter(10)(Image.new("RGB", (20, 45))).size == (10, 22)
    a = np.tile(np.arange(10, dtype=np.uint8)[None, :, None], (6, 1, 3))  # value = column
    crop = np.asarray(CenterCrop(4)(Image.fromarray(a)))
    assert crop.shape == (4, 4, 3) and crop[0, :, 0].tolist() == [3, 4, 5, 6]
    padded = np.asarray(CenterCrop(8)(Image.fromarray(np.full((4, 4, 3), 9, np.uint8))))
    assert padded.shape == (8, 8, 3) and padded[2:6, 2:6].min() == 9 and padded[0].max() == 0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    t = imagenet_eval_transform(16, 18)(img)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    x = ToNormalizedTensor((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(img)
    torch.testing.assert_close(x, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)


# ------------------------------------------------------------------------- the real CIFAR-10 JPEG data

README_MD5 = {
    "x_train": "7c618da940c26da995ad1feaa1bac54c",
    "x_test": "bda03800bb61288f5ba24f2522420517",
    "y_train": "69c5f3349be54915edfca558b72ad888",
    "y_test": "251f18ce75337ae9ca5d0dbd7ea62cf4",
}


def _shared_data_root() -> Path | None:
    env = os.environ.get("LEANPROP_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if find_jpeg_files(root) else None


@pytest.fixture(scope="session")
def jpeg_cache(tmp_path_factory):
    root = _shared_data_root()
    if root is None:
        pytest.skip("shared CIFAR-10 JPEG data not found: set LEANPROP_DATA to the folder holding "
                    "cifar10/CIFAR-10-images-jpeg.tar.gz (CI uses ../shared/data)")
    keep = os.environ.get("LEANPROP_TEST_CACHE")
    cache = Path(keep) if keep else tmp_path_factory.mktemp("jpeg_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANPROP_CACHE", str(cache))
        t0 = time.perf_counter()
        _, _, info = load_cifar10_jpeg(*find_jpeg_files(root), progress=False)
        how = "cache hit" if info["cached"] else "decoded"
        print(f"\nCIFAR-10 JPEG: {how} in {time.perf_counter() - t0:.1f}s")
    return root, cache


def test_real_jpeg_cifar10(jpeg_cache, monkeypatch):
    import PIL

    root, cache = jpeg_cache
    monkeypatch.setenv("LEANPROP_CACHE", str(cache))
    arrays, classes, info = load_cifar10_jpeg(*find_jpeg_files(root), progress=False)
    assert info["cached"]  # the second load reads the cache (no wall-clock bound: the machine may be busy)
    assert classes[:3] == ["airplane", "automobile", "bird"]
    assert arrays["x_train"].shape == (50000, 32, 32, 3) and arrays["x_test"].shape == (10000, 32, 32, 3)
    md5 = {k: hashlib.md5(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in arrays.items()}
    assert md5["y_train"] == README_MD5["y_train"] and md5["y_test"] == README_MD5["y_test"]
    if PIL.__version__ == "13.0.0":  # the README's pixel md5s are for Pillow 13.0.0's libjpeg
        assert md5["x_train"] == README_MD5["x_train"] and md5["x_test"] == README_MD5["x_test"]
    # original order: the decoded JPEGs are close to the lossless originals (a wrong pairing is ~9.5 dB)
    lossless = root / "cifar10" / "cifar10_lossless_subset.npz"
    if lossless.is_file():
        with np.load(lossless) as z:
            ref, pos = z["x_test"][:200].astype(np.float64), z["test_index"][:200]
        mse = ((arrays["x_test"][pos].astype(np.float64) - ref) ** 2).mean((1, 2, 3))
        assert (10 * np.log10(255**2 / np.maximum(mse, 1e-9))).min() > 20
    # build_data picks the JPEG archive automatically when the pickles are absent
    b = build_data(DataConfig(name="cifar10", root=str(root), batch_size=500), progress=False)
    if not (root / "cifar-10-batches-py").is_dir():
        assert "JPEG" in b.description and "50000 train / 10000 test" in b.description
        assert len(b.train) == 100 and b.num_classes == 10
        x, y = next(iter(b.train))
        assert x.shape == (500, 3, 32, 32) and abs(float(x.mean())) < 0.3
