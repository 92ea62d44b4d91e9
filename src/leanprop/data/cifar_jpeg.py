"""CIFAR-10 from the shared JPEG archive, decoded once and cached as uint8 arrays.

The archive ``cifar10/CIFAR-10-images-jpeg.tar.gz`` holds ``train/<class>/NNNN.jpg`` and
``test/<class>/NNNN.jpg``; ``cifar10/cifar10_labels_original_order.npz`` holds the original labels. The
k-th image of class c in the original order is file ``<split>/<class c>/{k:04d}.jpg``, which restores the
original CIFAR-10 order. The tar.gz is read into memory and walked directly (nothing is extracted to
disk); decoding uses Pillow, in a few forked processes where available.

The decoded arrays are cached under ``cache_dir()/cifar10_jpeg_<key>/`` where the key hashes the
archive and label file contents and the Pillow version (another libjpeg build may decode +-1 differently).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import multiprocessing
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from tqdm.auto import tqdm

from leanprop.data.paths import load_array_cache, save_array_cache
from leanprop.utils import cache_dir, file_lock

JPEG_SUBDIR = "cifar10"
JPEG_ARCHIVE = "CIFAR-10-images-jpeg.tar.gz"
JPEG_LABELS = "cifar10_labels_original_order.npz"
_CACHE_FORMAT = 1
_SPLIT_SIZES = {"train": 50000, "test": 10000}


def find_jpeg_files(root: Path) -> tuple[Path, Path] | None:
    """``(archive, labels)`` under ``root/cifar10/`` (or directly in ``root``), or None."""
    for folder in (root / JPEG_SUBDIR, root):
        archive, labels = folder / JPEG_ARCHIVE, folder / JPEG_LABELS
        if archive.is_file() and labels.is_file():
            return archive, labels
    return None


class _NotPlainTar(Exception):
    """The fast tar walker met something only the ``tarfile`` module handles (pax/GNU long names...)."""


def _walk_plain_tar(raw: bytes) -> Iterator[tuple[str, memoryview]]:
    """Regular files of an uncompressed ustar/v7 archive as ``(name, data)``, without copying.

    ``tarfile`` spends ~40 us of Python per member; this reads the fixed header fields directly.
    Raises :class:`_NotPlainTar` on extension headers or a bad checksum.
    """
    view = memoryview(raw)
    off, end = 0, len(raw)
    while off + 512 <= end:
        header = raw[off:off + 512]
        if header.count(0) == 512:  # end-of-archive marker
            return
        try:
            checksum = int(header[148:156].strip(b"\0 ") or b"-1", 8)
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError as e:  # base-256 sizes and the like
            raise _NotPlainTar(str(e)) from e
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:  # the field counts as 8 spaces
            raise _NotPlainTar("header checksum mismatch")
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"5", b"7", b"1", b"2"):
            raise _NotPlainTar(f"member type {kind!r}")
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0":  # POSIX ustar has a name prefix field (GNU tar does not)
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        start = off + 512
        if kind in (b"0", b"\0", b"7"):
            yield name.decode("utf-8", "replace"), view[start:start + size]
        off = start + (size + 511) // 512 * 512


def iter_tar_files(raw: bytes) -> Iterator[tuple[str, bytes | memoryview]]:
    """Regular files of an in-memory (uncompressed) tar archive as ``(name, data)``."""
    try:
        yield from list(_walk_plain_tar(raw))
        return
    except _NotPlainTar:
        pass
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf:
            if m.isfile():
                yield m.name, raw[m.offset_data:m.offset_data + m.size]


def decode_jpegs(blobs: list, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Decode encoded RGB images of one size (w, h) into an ``(N, h, w, 3)`` uint8 array."""
    w, h = size
    out = np.empty((len(blobs), h, w, 3), np.uint8)
    flat = out.reshape(len(blobs), -1)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as im:
            if im.size != (w, h):
                raise ValueError(f"image {i} is {im.size[0]}x{im.size[1]}, expected {w}x{h}")
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            flat[i] = np.frombuffer(rgb.tobytes(), np.uint8)
    return out


_FORK_BLOBS: list = []  # the blobs, inherited by forked decoder processes (memoryviews do not pickle)


def _decode_range(bounds: tuple[int, int]) -> np.ndarray:
    return decode_jpegs(_FORK_BLOBS[bounds[0]:bounds[1]])


def _decode_all(blobs: list, processes: int, progress: bool) -> np.ndarray:
    global _FORK_BLOBS
    out = np.empty((len(blobs), 32, 32, 3), np.uint8)
    chunk = 2000
    ranges = [(s, min(s + chunk, len(blobs))) for s in range(0, len(blobs), chunk)]
    bar = tqdm(total=len(blobs), desc="decoding CIFAR-10 JPEGs", unit="img", disable=not progress,
               dynamic_ncols=True)
    with bar:
        if processes > 1:
            _FORK_BLOBS = blobs
            try:
                ctx = multiprocessing.get_context("fork")
                with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
                    for (s, e), part in zip(ranges, pool.map(_decode_range, ranges), strict=True):
                        out[s:e] = part
                        bar.update(e - s)
            finally:
                _FORK_BLOBS = []
        else:
            for s, e in ranges:
                out[s:e] = decode_jpegs(blobs[s:e])
                bar.update(e - s)
    return out


def _default_processes() -> int:
    if not sys.platform.startswith("linux"):  # fork is only dependable on Linux
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def decode_cifar10_jpeg(archive: Path, labels_file: Path, *, progress: bool = True,
                        processes: int | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Decode the archive into ``x_train, y_train, x_test, y_test`` (original order) and the class names."""
    with np.load(labels_file, allow_pickle=False) as z:
        missing = {"y_train", "y_test", "classes"} - set(z.files)
        if missing:
            raise ValueError(f"{labels_file} lacks {sorted(missing)} (found {sorted(z.files)})")
        labels = {"train": np.asarray(z["y_train"]), "test": np.asarray(z["y_test"])}
        classes = [str(c) for c in z["classes"]]
    class_index = {c: i for i, c in enumerate(classes)}
    # table[split][c, k] = position in the original order of the k-th image of class c
    table, blobs = {}, {}
    for split, y in labels.items():
        if len(y) != _SPLIT_SIZES[split] or y.min() < 0 or y.max() >= len(classes):
            raise ValueError(f"{labels_file}: y_{split} has unexpected length or labels")
        counts = np.bincount(y, minlength=len(classes))
        t = np.full((len(classes), counts.max()), -1, np.int64)
        order = np.argsort(y, kind="stable")  # positions grouped by class, ascending within a class
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        t[y[order], np.arange(len(y)) - starts[y[order]]] = order
        table[split] = t
        blobs[split] = [None] * len(y)

    with open(archive, "rb") as f:
        raw = gzip.decompress(f.read())
    for name, data in iter_tar_files(raw):
        parts = name.replace("\\", "/").split("/")
        if len(parts) < 3 or parts[-3] not in table or not parts[-1].lower().endswith(".jpg"):
            continue
        split, cls, stem = parts[-3], parts[-2], parts[-1][:-4]
        c = class_index.get(cls)
        if c is None or not stem.isdigit():
            raise ValueError(f"{archive}: unexpected member {name} (class must be one of {classes})")
        k = int(stem)
        t = table[split]
        if k >= t.shape[1] or t[c, k] < 0:
            raise ValueError(f"{archive}: {name} has no matching label in {labels_file.name}")
        blobs[split][t[c, k]] = data
    for split, items in blobs.items():
        if any(b is None for b in items):
            i = next(i for i, b in enumerate(items) if b is None)
            c = int(labels[split][i])
            k = int(np.sum(labels[split][:i] == c))
            n_missing = sum(b is None for b in items)
            raise ValueError(f"{archive} lacks {split}/{classes[c]}/{k:04d}.jpg ({n_missing} {split} images "
                             "missing); the archive is incomplete")

    if processes is None:
        processes = _default_processes()
    order = blobs["train"] + blobs["test"]
    x = _decode_all(order, processes, progress)
    n = len(blobs["train"])
    arrays = {"x_train": x[:n], "y_train": labels["train"].astype(np.uint8),
              "x_test": x[n:], "y_test": labels["test"].astype(np.uint8)}
    return arrays, classes


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def jpeg_cache_folder(archive: Path, labels_file: Path) -> Path:
    """Cache folder for this archive + labels file + Pillow version."""
    key = hashlib.md5(f"{_file_md5(archive)}:{_file_md5(labels_file)}:pillow-{PIL.__version__}:"
                      f"v{_CACHE_FORMAT}".encode()).hexdigest()[:16]
    return cache_dir() / f"cifar10_jpeg_{key}"


def load_cifar10_jpeg(archive: Path, labels_file: Path, *, progress: bool = True,
                      processes: int | None = None) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """Arrays from the cache, decoding (once, under a lock shared by concurrent processes) if needed.

    Returns ``(arrays, classes, info)``; ``info`` has ``cache`` (folder), ``cached`` (bool: came from the
    cache) and ``seconds``.
    """
    t0 = time.perf_counter()
    folder = jpeg_cache_folder(archive, labels_file)
    hit = load_array_cache(folder)
    if hit is None:
        with file_lock(folder.parent / f"{folder.name}.lock"):
            hit = load_array_cache(folder)  # another process may have written it while we waited
            if hit is None:
                arrays, classes = decode_cifar10_jpeg(archive, labels_file, progress=progress,
                                                      processes=processes)
                meta = {"classes": classes, "archive": str(archive), "labels": str(labels_file),
                        "pillow": PIL.__version__, "format": _CACHE_FORMAT}
                save_array_cache(folder, arrays, meta)
                return arrays, classes, {"cache": folder, "cached": False,
                                         "seconds": time.perf_counter() - t0}
    arrays, meta = hit
    return arrays, list(meta["classes"]), {"cache": folder, "cached": True,
                                           "seconds": time.perf_counter() - t0}
