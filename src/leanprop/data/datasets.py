"""User-supplied datasets: an ``.npz`` of arrays, an image folder tree, and the synthetic smoke-test set."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from tqdm.auto import tqdm

from leanprop.data.arrays import ArraySplits
from leanprop.data.augment import channel_stats
from leanprop.data.paths import load_array_cache, save_array_cache
from leanprop.utils import cache_dir, file_lock

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SMALL_IMAGE_MAX = 64  # folders whose images are all at most this size (and equal) are decoded into memory
_FOLDER_CACHE_FORMAT = 1
_GRAY_MODES = ("1", "L", "I", "I;16", "F")


# ----------------------------------------------------------------------------------------------- npz


def _check_images(key: str, x: np.ndarray) -> np.ndarray:
    what = f"{key} must be uint8 NHWC or NHW, got {x.dtype} {tuple(x.shape)}"
    if x.dtype != np.uint8:
        hint = ""
        if np.issubdtype(x.dtype, np.floating):
            hint = " (for floats in [0, 1] store np.round(x * 255).astype(np.uint8))"
        raise ValueError(what + hint)
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4:
        raise ValueError(what + f": expected 3 or 4 dimensions, not {x.ndim}")
    if x.shape[1] <= 4 < x.shape[-1]:
        raise ValueError(what + ": this looks like NCHW; store x.transpose(0, 2, 3, 1) instead")
    if len(x) == 0:
        raise ValueError(f"{key} holds no images")
    return x


def _check_labels(key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{key} must be a 1-D integer array of class indices, got {y.dtype} "
                         f"{tuple(y.shape)}")
    if len(y) != n:
        raise ValueError(f"{key} has {len(y)} labels but x_{key[2:]} has {n} images: the lengths must match")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{key} has negative labels (min {int(y.min())}); labels must be 0 .. num_classes-1")
    return y.astype(np.int64)


def load_npz(path: str | os.PathLike) -> ArraySplits:
    """Arrays ``x_train, y_train, x_test, y_test`` (uint8 NHWC, or NHW for one channel; integer labels).

    An optional ``classes`` array names the classes. num_classes = largest label + 1; the normalisation
    mean/std are computed per channel from ``x_train``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"npz dataset {p} does not exist (data.path); it must hold x_train, y_train, "
                                "x_test, y_test")
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p} is not a readable .npz file: {e}") from e
    if not hasattr(z, "files"):
        raise ValueError(f"{p} is a single .npy array; save an .npz with np.savez(path, x_train=..., "
                         "y_train=..., x_test=..., y_test=...)")
    with z:
        required = ("x_train", "y_train", "x_test", "y_test")
        missing = [k for k in required if k not in z.files]
        if missing:
            raise ValueError(f"{p} lacks {', '.join(missing)} (it has: {', '.join(z.files) or 'nothing'})")
        try:
            arrays = {k: z[k] for k in required}
            names = [str(c) for c in z["classes"]] if "classes" in z.files else None
        except ValueError as e:
            raise ValueError(f"{p}: cannot read the arrays without pickle ({e}); store plain numeric "
                             "arrays") from e
    x_train = _check_images("x_train", arrays["x_train"])
    x_test = _check_images("x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"x_train images are {x_train.shape[1:]} (HWC) but x_test images are "
                         f"{x_test.shape[1:]}")
    y_train = _check_labels("y_train", arrays["y_train"], len(x_train))
    y_test = _check_labels("y_test", arrays["y_test"], len(x_test))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if names is not None:
        if len(names) < num_classes:
            raise ValueError(f"{p}: 'classes' names {len(names)} classes but the labels go up to "
                             f"{num_classes - 1}")
        classes = names
    else:
        classes = [str(i) for i in range(num_classes)]
    mean, std = channel_stats(x_train)
    return ArraySplits(np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test, classes,
                       mean, std, f"npz file {p}")


# -------------------------------------------------------------------------------------------- folder


@dataclass
class FolderSplits:
    """Image files of a ``root/<split>/<class>/*`` tree as (path, label) lists."""

    root: Path
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    test_split: str  # "test" or "val"


def _scan_split(split_dir: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
    with os.scandir(split_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not class_dirs:
        loose = [e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)]
        more = (f"; it holds {len(loose)} images directly, but they must be sorted into one sub-folder "
                "per class" if loose else "")
        raise FileNotFoundError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>.png "
                                f"(extensions {', '.join(IMAGE_EXTENSIONS)}){more}")
    names = [e.name for e in class_dirs]
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir} has classes that the training split lacks: "
                             f"{', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for d in class_dirs:
        with os.scandir(d.path) as it:
            files = sorted(e.path for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
        if not files:
            raise FileNotFoundError(f"class folder {d.path} contains no images "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((f, index[d.name]) for f in files)
    return samples, classes


def scan_folder(root: str | os.PathLike, test_splits: tuple[str, ...] = ("test", "val")) -> FolderSplits:
    """List ``root/train/<class>/*`` and the first existing of ``root/test`` / ``root/val``.

    Classes are the training split's sub-folder names, sorted. Raises FileNotFoundError for a missing
    split folder, a class folder without images or a split without class folders.
    """
    root = Path(root).expanduser()
    layout = f"{root}/train/<class>/*.png and {root}/{test_splits[0]}/<class>/*.png"
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {layout} "
                                "(set the folder with data.path, --data-dir or LEANPROP_DATA)")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"missing training split {train_dir}; expected {layout}")
    test_dir = next((root / s for s in test_splits if (root / s).is_dir()), None)
    if test_dir is None:
        expected = " or ".join(str(root / s) for s in test_splits)
        raise FileNotFoundError(f"missing evaluation split {expected}; expected {layout}")
    train, classes = _scan_split(train_dir, None)
    test, _ = _scan_split(test_dir, classes)
    return FolderSplits(root, train, test, classes, test_dir.name)


def small_image_format(samples: list[tuple[str, int]],
                       max_side: int = SMALL_IMAGE_MAX) -> tuple[int, int, int] | None:
    """``(height, width, channels)`` when every image is at most ``max_side`` px and all share one size,
    else None. Reads only image headers and stops at the first image that does not fit."""
    size, gray = None, True
    for path, _ in samples:
        with Image.open(path) as im:
            if size is None:
                size = im.size
            if im.size != size or max(im.size) > max_side:
                return None
            gray = gray and im.mode in _GRAY_MODES
    if size is None:
        return None
    return size[1], size[0], 1 if gray else 3


def _folder_cache_folder(fs: FolderSplits, shape: tuple[int, int, int]) -> Path:
    h = hashlib.md5()
    h.update(f"{fs.root.resolve()}|{fs.classes}|{shape}|pillow-{PIL.__version__}|v{_FOLDER_CACHE_FORMAT}".encode())
    for split, samples in (("train", fs.train), (fs.test_split, fs.test)):
        for path, label in samples:
            st = os.stat(path)
            h.update(f"{split}|{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return cache_dir() / f"folder_{h.hexdigest()[:16]}"


def _decode_files(samples: list[tuple[str, int]], shape: tuple[int, int, int], progress: bool, desc: str):
    h, w, c = shape
    x = np.empty((len(samples), h, w, c), np.uint8)
    bar = tqdm(samples, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for i, (path, _) in enumerate(bar):
        with Image.open(path) as im:
            a = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        x[i] = a.reshape(h, w, c)
    y = np.array([label for _, label in samples], np.int64)
    return x, y


def load_folder_arrays(fs: FolderSplits, shape: tuple[int, int, int], *,
                       progress: bool = True) -> ArraySplits:
    """Decode a small-image folder into memory once; later calls load the cached arrays."""
    folder = _folder_cache_folder(fs, shape)
    hit = load_array_cache(folder)
    how = "loaded from cache"
    if hit is None:
        with file_lock(folder.parent / f"{folder.name}.lock"):
            hit = load_array_cache(folder)
            if hit is None:
                x_train, y_train = _decode_files(fs.train, shape, progress, "decoding train images")
                x_test, y_test = _decode_files(fs.test, shape, progress, f"decoding {fs.test_split} images")
                arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
                mean, std = channel_stats(x_train)
                save_array_cache(folder, arrays, {"root": str(fs.root), "classes": fs.classes,
                                                  "mean": mean, "std": std})
                hit = arrays, {"mean": mean, "std": std}
                how = "decoded"
    arrays, meta = hit
    h, w, c = shape
    return ArraySplits(arrays["x_train"], arrays["y_train"].astype(np.int64), arrays["x_test"],
                       arrays["y_test"].astype(np.int64), list(fs.classes), tuple(meta["mean"]),
                       tuple(meta["std"]), f"image folder {fs.root}, {w}x{h} images {how} into memory")


# ----------------------------------------------------------------------------------------- synthetic


def make_synthetic(n_train: int, n_test: int, num_classes: int, size: int, channels: int = 3) -> ArraySplits:
    """Random uint8 images for SMOKE TESTS ONLY (not a benchmark): each class has a fixed random blocky
    pattern and its images are that pattern plus noise, so a model can learn something. The data are the
    same for every run seed (fixed generator)."""
    if min(n_train, n_test) < 1 or num_classes < 1 or size < 1:
        raise ValueError("synthetic data needs synthetic_train, synthetic_test, synthetic_classes and "
                         f"synthetic_size >= 1 (got {n_train}, {n_test}, {num_classes}, {size})")
    rng = np.random.default_rng(20240601)
    cells = max(1, min(4, size))
    block = -(-size // cells)
    protos = rng.uniform(0, 255, (num_classes, cells, cells, channels))
    protos = protos.repeat(block, 1).repeat(block, 2)[:, :size, :size]

    def split(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng([20240601, stream])
        y = r.integers(0, num_classes, n)
        noise = r.uniform(0, 255, (n, size, size, channels))
        x = np.clip(0.6 * protos[y] + 0.4 * noise, 0, 255).round().astype(np.uint8)
        return x, y.astype(np.int64)

    x_train, y_train = split(n_train, 1)
    x_test, y_test = split(n_test, 2)
    mean, std = channel_stats(x_train)
    return ArraySplits(x_train, y_train, x_test, y_test, [f"class{i}" for i in range(num_classes)], mean, std,
                       "SYNTHETIC random images (smoke tests only, not a real dataset)")
