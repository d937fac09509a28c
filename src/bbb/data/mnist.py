"""MNIST from the original IDX files, with the split protocol of Blundell et al. (2015).

Files (gzip, as downloaded from the usual mirrors or found in torchvision's ``MNIST/raw/``):
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``. Uncompressed copies (same names without ``.gz``) are accepted too;
whether a file is gzip is read from its content, not its name.

Splits: ``train`` = first 50000 training images, ``val`` = last 10000 training images,
``test`` = the 10000 t10k images, ``train_full`` = all 60000 training images. Pixels (0..255)
are divided by ``scale`` (126 in the paper), so values lie in [0, 255/126].
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .checksums import (
    MNIST_SHA256,
    MNIST_SOURCE,
    ChecksumError,
    DataError,
    MissingDataError,
    describe_link,
    read_gzip_bytes,
    require_file,
    resolve_data_dir,
    verify_bytes,
)

__all__ = ["MNIST_SPLITS", "find_mnist_dir", "load_mnist", "parse_idx", "read_idx"]

MNIST_SPLITS: tuple[str, ...] = ("train", "val", "test", "train_full")
"""Accepted ``split`` values of `load_mnist`."""

N_TRAIN_FULL = 60000
N_TRAIN = 50000
IMAGE_SHAPE = (28, 28)

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type byte -> numpy dtype (big-endian for multi-byte types).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Parse the (decompressed) bytes of an IDX file into a read-only numpy array.

    Header: two zero bytes, a type byte (0x08 = uint8, ...), the number of dimensions ``d``,
    then ``d`` big-endian uint32 sizes; the payload follows in C order.

    Raises:
        DataError: bad magic number, unknown type, or payload size not matching the header;
            the message names ``name``.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number {data[:4].hex()!r})")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{name}: unknown IDX data type 0x{type_code:02x}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{name}: IDX header truncated ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    # Python integers: a damaged header's sizes (up to 2**32 - 1 each) overflow int64
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header_len != expected:
        raise DataError(
            f"{name}: IDX header announces shape {dims} ({expected} payload bytes) but the "
            f"file holds {len(data) - header_len} payload bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)


_GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes (an IDX file starts with two zeros)."""
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def read_idx(path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> np.ndarray:
    """Read an IDX file, gzip or not, optionally verifying its content.

    Whether the file is gzip is read from its first bytes, not its name: browsers and some
    download tools store a decompressed file under the ``.gz`` name, and a gzip file may have
    lost its suffix; either is read (and verified on its decompressed content) as it is.

    Args:
        path: the file.
        expected_sha256: SHA-256 of the *decompressed* content, or None to skip verification.

    Returns:
        Read-only numpy array with the shape given in the IDX header.
    """
    path = require_file(path, MNIST_SOURCE)
    gzipped = _is_gzip(path)
    if gzipped:
        data = read_gzip_bytes(path, MNIST_SOURCE, expected_sha256=expected_sha256)
    else:
        data = path.read_bytes()
        if data[:2] != b"\x00\x00":
            # e.g. an error page saved under the file's name: say so, not only that its
            # digest differs (or that its "magic number" is wrong)
            error = DataError if expected_sha256 is None else ChecksumError
            what = (
                "is empty"
                if not data
                else f"is neither a gzip file nor an IDX file (it starts with {data[:16]!r}; "
                "an HTML page or an interrupted download?)"
            )
            raise error(f"{path} {what}. Get a fresh copy from {MNIST_SOURCE}.")
    if expected_sha256 is not None:
        verify_bytes(
            data,
            expected_sha256,
            path=path,
            decompress=gzipped,
            source_hint=MNIST_SOURCE,
        )
    return parse_idx(data, name=str(path))


def find_mnist_dir(
    data_dir: str | os.PathLike[str] | None = None, *, split: str | None = None
) -> Path:
    """Directory holding the MNIST files under the data directory.

    Looks in ``<data-dir>/mnist``, ``<data-dir>/MNIST/raw`` (torchvision layout) and
    ``<data-dir>`` itself, in that order. With ``split``, the first of them holding both files
    (images and labels) that the split reads is taken, so a folder holding only the test
    files does not hide a complete one further down the list; else (or if none holds both)
    the first holding any MNIST images file.

    Raises:
        MissingDataError: none of them holds ``train-images-idx3-ubyte[.gz]`` or
            ``t10k-images-idx3-ubyte[.gz]``.
    """
    root = resolve_data_dir(data_dir)
    candidates = [root / "mnist", root / "MNIST" / "raw", root]
    if split is not None:
        stems = _FILES["test" if split == "test" else "train"]
        for candidate in candidates:
            if all(_idx_path(candidate, stem) for stem in stems):
                return candidate
    for candidate in candidates:
        if _idx_path(candidate, _FILES["train"][0]) or _idx_path(candidate, _FILES["test"][0]):
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    broken = [
        f"{link} is a broken symbolic link to {describe_link(link)}"
        for c in candidates
        for stem in (_FILES["train"][0], _FILES["test"][0])
        for link in (c / f"{stem}.gz", c / stem)
        if link.is_symlink() and not link.exists()
    ]
    found = f" ({'; '.join(broken)})" if broken else ""
    raise MissingDataError(
        f"No MNIST files found (looked in {tried}){found}. Get them from {MNIST_SOURCE}."
    )


def _idx_path(directory: Path, stem: str) -> Path | None:
    """``directory/stem.gz`` or ``directory/stem`` if either exists."""
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            return path
    return None


def _load_pair(directory: Path, part: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of ``part`` ("train" or "test")."""
    arrays = []
    for stem in _FILES[part]:
        path = _idx_path(directory, stem) or directory / f"{stem}.gz"
        arrays.append(read_idx(path, expected_sha256=MNIST_SHA256[stem] if verify else None))
    images, labels = arrays
    _check_pair(images, labels, directory, part)
    return images, labels


def _check_pair(images: np.ndarray, labels: np.ndarray, directory: Path, part: str) -> None:
    """Validate shapes, dtypes and label range of an images/labels pair."""
    name = f"MNIST {part} files in {directory}"
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise DataError(
            f"{name}: images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{name}: labels must be uint8 (N,), got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{name}: label {int(labels.max())} outside 0..9")


def _select(split: str, n: int) -> slice:
    """Rows of the training file (``n`` rows) or test file belonging to ``split``."""
    if split in ("train", "val") and n != N_TRAIN_FULL:
        raise DataError(
            f"split {split!r} needs the {N_TRAIN_FULL}-image MNIST training file, found {n}"
        )
    if split == "train":
        return slice(0, N_TRAIN)
    if split == "val":
        return slice(N_TRAIN, N_TRAIN_FULL)
    return slice(0, n)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: str,
    scale: float = 126.0,
    flatten: bool = True,
    subset: int | None = None,
    verify: bool = True,
    dtype: torch.dtype = torch.float32,
) -> TensorDataset:
    """Load one MNIST split as a `TensorDataset` of ``(images, labels)``.

    Args:
        data_dir: data directory (see `resolve_data_dir`); MNIST files are looked up with
            `find_mnist_dir`.
        split: ``"train"`` (first 50000 training images), ``"val"`` (last 10000),
            ``"test"`` (t10k, 10000) or ``"train_full"`` (all 60000).
        scale: pixel values 0..255 are divided by this (126 in Blundell et al. 2015).
        flatten: images of shape (N, 784) if True, else (N, 1, 28, 28).
        subset: keep only the first ``subset`` examples of the split (tiny runs, tests).
        verify: check the SHA-256 of the decompressed files against the known digests.
        dtype: floating dtype of the images.

    Returns:
        ``TensorDataset(x, y)``: ``x`` of ``dtype``, shape (N, 784) or (N, 1, 28, 28), values in
        [0, 255/scale]; ``y`` int64 class labels 0..9, shape (N,).

    Raises:
        ValueError: unknown split, non-positive or infinite scale, or subset out of range.
        TypeError: a non-integer subset, a non-number scale, or a non-floating dtype.
        MissingDataError / ChecksumError / DataError: missing, corrupt or malformed files.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; expected one of {list(MNIST_SPLITS)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number, got {type(scale).__name__} {scale!r}")
    if not (scale > 0 and math.isfinite(scale)):  # inf made every pixel 0
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    if subset is not None and (
        isinstance(subset, bool) or not isinstance(subset, numbers.Integral)
    ):
        # True was taken as 1, 2.5 failed in numpy's slicing
        raise TypeError(f"subset must be an int or None, got {type(subset).__name__} {subset!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (images / scale), got {dtype!r}")
    directory = find_mnist_dir(data_dir, split=split)
    images, labels = _load_pair(directory, "test" if split == "test" else "train", verify)
    rows = _select(split, images.shape[0])
    images, labels = images[rows], labels[rows]
    if subset is not None:
        if subset < 1 or subset > images.shape[0]:
            raise ValueError(
                f"subset must be in 1..{images.shape[0]} for split {split!r}, got {subset}"
            )
        images, labels = images[: int(subset)], labels[: int(subset)]
    x = torch.from_numpy(images.astype(np.float32)).to(dtype).div_(float(scale))
    x = x.reshape(-1, IMAGE_SHAPE[0] * IMAGE_SHAPE[1]) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)
