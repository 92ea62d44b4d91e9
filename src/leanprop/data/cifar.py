"""CIFAR-10 / CIFAR-100 from the official python pickles (optionally downloaded), or CIFAR-10 from JPEGs."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from leanprop.data.arrays import ArraySplits
from leanprop.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from leanprop.data.cifar_jpeg import (
    JPEG_ARCHIVE,
    JPEG_LABELS,
    JPEG_SUBDIR,
    find_jpeg_files,
    load_cifar10_jpeg,
)
from leanprop.utils import cache_dir, file_lock

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# official archives; a module-level table so tests can point the downloader at a local file:// URL
ARCHIVES = {
    "cifar10": {
        "title": "CIFAR-10",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels_key": b"labels",
        "meta": ("batches.meta", b"label_names"),
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
    },
    "cifar100": {
        "title": "CIFAR-100",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "labels_key": b"fine_labels",
        "meta": ("meta", b"fine_label_names"),
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
    },
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict (CIFAR python format), got {type(obj).__name__}")
    return obj


def _read_batches(folder: Path, names: list[str], labels_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        d = _unpickle(folder / name)
        if b"data" not in d or labels_key not in d:
            raise ValueError(f"{folder / name}: missing b'data' or {labels_key!r} (keys: {sorted(d)})")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder / name}: b'data' should be uint8 (N, 3072), got {data.shape}")
        labels = np.asarray(d[labels_key], dtype=np.int64)
        if len(labels) != len(data):
            raise ValueError(f"{folder / name}: {len(data)} images but {len(labels)} labels")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are planar RGB
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _missing(folder: Path, spec: dict) -> list[str]:
    return [n for n in spec["train"] + spec["test"] if not (folder / n).is_file()]


def load_cifar_pickles(root: Path, name: str) -> ArraySplits:
    """Read ``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python`` (fine labels)."""
    spec = ARCHIVES[name]
    folder = root / spec["folder"]
    x_train, y_train = _read_batches(folder, spec["train"], spec["labels_key"])
    x_test, y_test = _read_batches(folder, spec["test"], spec["labels_key"])
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    classes = CIFAR10_CLASSES if name == "cifar10" else [str(i) for i in range(max(num_classes, 100))]
    meta_file, meta_key = spec["meta"]
    if (folder / meta_file).is_file():
        meta = _unpickle(folder / meta_file)
        if meta_key in meta:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[meta_key]]
    if num_classes > len(classes):
        raise ValueError(f"{folder}: label {num_classes - 1} but only {len(classes)} classes")
    return ArraySplits(x_train, y_train, x_test, y_test, list(classes), spec["mean"], spec["std"],
                       f"{spec['title']} from python pickles in {folder}")


def missing_data_message(root: Path, name: str, source: str, extra: str = "", *,
                         offer_download: bool = True) -> str:
    """What to put where, for a CIFAR dataset that was not found."""
    spec = ARCHIVES[name]
    folder = root / spec["folder"]
    files = ", ".join(spec["train"] + spec["test"])
    lines = [f"{spec['title']} was not found in the data directory {root}."]
    if extra:
        lines.append(extra)
    lines.append("Provide it in one of these ways:")
    if source in ("auto", "pickle"):
        lines.append(f"  * the official python version: extract {spec['url']} so that {folder}/ "
                     f"holds {files}")
    if name == "cifar10" and source in ("auto", "jpeg"):
        jdir = root / JPEG_SUBDIR
        lines.append(f"  * the JPEG copy: put {JPEG_ARCHIVE} and {JPEG_LABELS} in {jdir}/ "
                     "(decoded once and cached; select it with --set data.source=jpeg or leave source=auto)")
    lines.append("  * use another data directory: --data-dir DIR (config key data.root) or the environment "
                 "variable LEANPROP_DATA=DIR")
    if source != "jpeg" and offer_download:
        lines.append(f"  * download the official archive into {root}: --set data.download=true")
    return "\n".join(lines)


def download_cifar(root: Path, name: str, *, progress: bool = True) -> Path:
    """Download the official archive, check its md5 and extract it atomically into ``root``.

    Raises FileNotFoundError (explaining the offline alternatives) when the download or the check fails.
    """
    spec = ARCHIVES[name]
    target = root / spec["folder"]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileNotFoundError(missing_data_message(root, name, "auto", f"Cannot create {root}: {e}")) from e
    lock = cache_dir() / f"download_{hashlib.md5(str(target.resolve()).encode()).hexdigest()[:12]}.lock"
    with file_lock(lock):  # one downloader at a time (e.g. DDP ranks)
        if target.is_dir() and not _missing(target, spec):
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".tar.gz.part", dir=root)
        tmp = Path(tmp_name)
        extract_dir: Path | None = None
        try:
            md5 = hashlib.md5()
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec["url"], timeout=60) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                              desc=f"downloading {spec['title']}", dynamic_ncols=True) as bar:
                        for block in iter(lambda: resp.read(1 << 20), b""):
                            out.write(block)
                            md5.update(block)
                            bar.update(len(block))
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise FileNotFoundError(missing_data_message(
                    root, name, "auto", f"Downloading {spec['url']} failed ({e}); are you offline?",
                    offer_download=False)) from e
            if md5.hexdigest() != spec["md5"]:
                raise FileNotFoundError(missing_data_message(
                    root, name, "auto", f"The download from {spec['url']} is corrupt (md5 {md5.hexdigest()}, "
                    f"expected {spec['md5']}); try again."))
            extract_dir = Path(tempfile.mkdtemp(prefix=f".{name}-extract-", dir=root))
            with tarfile.open(tmp, "r:gz") as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(extract_dir, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tf.extractall(extract_dir)  # noqa: S202 - archive checked against the official md5
            extracted = extract_dir / spec["folder"]
            if not extracted.is_dir() or _missing(extracted, spec):
                raise FileNotFoundError(missing_data_message(
                    root, name, "auto", f"The archive from {spec['url']} does not contain {spec['folder']}/"))
            if target.exists():  # an incomplete earlier copy
                shutil.rmtree(target)
            os.replace(extracted, target)
        finally:
            tmp.unlink(missing_ok=True)
            if extract_dir is not None:
                shutil.rmtree(extract_dir, ignore_errors=True)
    return target


def load_cifar(root: Path, name: str, *, source: str = "auto", download: bool = False,
               progress: bool = True) -> ArraySplits:
    """CIFAR-10/100 as arrays, choosing between the pickles and (CIFAR-10 only) the JPEG archive.

    ``source``: ``pickle``, ``jpeg`` or ``auto`` (pickles if present, else the JPEG archive, else download
    when ``download`` is set).
    """
    if name not in ARCHIVES:
        raise ValueError(f"unknown CIFAR dataset {name!r}")
    if source not in ("auto", "pickle", "jpeg"):
        raise ValueError(f"data.source={source!r}: use auto, pickle or jpeg")
    if source == "jpeg" and name != "cifar10":
        raise ValueError(f"data.source=jpeg exists only for cifar10; {name} needs the python pickles "
                         "(data.source=auto or pickle)")
    spec = ARCHIVES[name]
    folder = root / spec["folder"]
    have_pickles = folder.is_dir() and not _missing(folder, spec)
    jpeg = find_jpeg_files(root) if name == "cifar10" and source != "pickle" else None

    if source == "jpeg" or (source == "auto" and not have_pickles and jpeg is not None):
        if jpeg is None:
            raise FileNotFoundError(missing_data_message(root, name, "jpeg"))
        archive, labels = jpeg
        arrays, classes, info = load_cifar10_jpeg(archive, labels, progress=progress)
        return ArraySplits(arrays["x_train"], arrays["y_train"].astype(np.int64), arrays["x_test"],
                           arrays["y_test"].astype(np.int64), classes, CIFAR10_MEAN, CIFAR10_STD,
                           f"CIFAR-10 from JPEG archive {archive.parent}")
    if not have_pickles:
        if not download:
            extra = ""
            if folder.is_dir():
                extra = f"{folder} exists but lacks {', '.join(_missing(folder, spec))}."
            raise FileNotFoundError(missing_data_message(root, name, source, extra))
        download_cifar(root, name, progress=progress)
    return load_cifar_pickles(root, name)
