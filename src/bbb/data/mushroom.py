"""The UCI Mushroom data set, one-hot encoded: the contextual-bandit environment of
Blundell et al. (2015), section 5.3.

``agaricus-lepiota.data``: 8124 comma-separated rows; column 0 is the class (``e`` edible,
``p`` poisonous), columns 1..22 are one-letter categorical attributes; ``?`` (missing
stalk-root) is kept as a category of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._text import read_text
from .checksums import (
    MUSHROOM_SHA256,
    MUSHROOM_SOURCE,
    DataError,
    MissingDataError,
    describe_link,
    resolve_data_dir,
    verify_file,
)

__all__ = ["MUSHROOM_ATTRIBUTES", "MUSHROOM_FILE", "Mushroom", "load_mushroom"]

MUSHROOM_FILE = "agaricus-lepiota.data"

MUSHROOM_ATTRIBUTES: tuple[str, ...] = (
    "cap-shape",
    "cap-surface",
    "cap-color",
    "bruises",
    "odor",
    "gill-attachment",
    "gill-spacing",
    "gill-size",
    "gill-color",
    "stalk-shape",
    "stalk-root",
    "stalk-surface-above-ring",
    "stalk-surface-below-ring",
    "stalk-color-above-ring",
    "stalk-color-below-ring",
    "veil-type",
    "veil-color",
    "ring-number",
    "ring-type",
    "spore-print-color",
    "population",
    "habitat",
)
"""The 22 attribute names of the UCI description (``agaricus-lepiota.names``), in file order
(``bruises?`` written as ``bruises``)."""

_CLASSES = {"e": True, "p": False}
#: the attribute values of the UCI file: one lowercase letter, or '?' (missing stalk-root)
_VALUES = frozenset("abcdefghijklmnopqrstuvwxyz?")


@dataclass(frozen=True, eq=False)
class Mushroom:
    """The one-hot encoded mushroom data.

    Attributes:
        contexts: float32 (N, F) one-hot features (N = 8124, F = 117 for the UCI file): one
            block per attribute in `MUSHROOM_ATTRIBUTES` order, columns within a block sorted by
            category letter, covering only categories present in the file.
        edible: bool (N,), True for class ``e``.
        feature_names: F names ``"<attribute>=<letter>"``, e.g. ``"cap-shape=b"``.
        path: the file read.
    """

    contexts: Tensor
    edible: Tensor
    feature_names: list[str]
    path: Path

    def __len__(self) -> int:
        """Number of mushrooms N."""
        return int(self.edible.shape[0])

    @property
    def n_features(self) -> int:
        """Context dimension F."""
        return int(self.contexts.shape[1])

    @property
    def poisonous(self) -> Tensor:
        """bool (N,), True for class ``p``."""
        return ~self.edible


def _find_file(data_dir: str | os.PathLike[str] | None) -> Path:
    """The mushroom file: ``data_dir`` itself if a file, else under ``mushroom/`` or the root."""
    if data_dir is not None:
        given = Path(data_dir).expanduser()  # as resolve_data_dir does for a directory
        if given.is_file():
            return given
        if given.name == MUSHROOM_FILE and not given.is_dir():
            # the file's own path (documented), missing: not "data directory ... does not
            # exist or is not a directory"
            raise MissingDataError(
                f"{_describe(given)} does not exist. Get it from {MUSHROOM_SOURCE}."
            )
    root = resolve_data_dir(data_dir)
    candidates = [root / "mushroom" / MUSHROOM_FILE, root / MUSHROOM_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(_describe(c) for c in candidates)
    raise MissingDataError(
        f"{MUSHROOM_FILE} not found (tried {tried}). Get it from {MUSHROOM_SOURCE}."
    )


def _describe(candidate: Path) -> str:
    """A candidate path for the not-found message: says if it is a directory or a broken
    symbolic link (and where that points)."""
    if candidate.is_dir():
        return f"{candidate} (a directory)"
    if candidate.is_symlink() and not candidate.exists():
        return f"{candidate} (a broken symbolic link to {describe_link(candidate)})"
    return str(candidate)


def _parse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the file as ``(edible bool (N,), attributes str (N, 22))``; errors name lines."""
    n_fields = 1 + len(MUSHROOM_ATTRIBUTES)
    edible: list[bool] = []
    rows: list[list[str]] = []
    text = read_text(path, DataError)  # a binary or damaged copy (verify=False): named
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != n_fields:
            raise DataError(
                f"{path}, line {lineno}: expected {n_fields} comma-separated fields "
                f"(class + {len(MUSHROOM_ATTRIBUTES)} attributes), got {len(fields)}"
            )
        if fields[0] not in _CLASSES:
            raise DataError(
                f"{path}, line {lineno}: unknown class {fields[0]!r} (expected 'e' or 'p')"
            )
        if not all(fields[1:]):
            column = fields.index("", 1)
            raise DataError(
                f"{path}, line {lineno}: empty value for attribute "
                f"{MUSHROOM_ATTRIBUTES[column - 1]!r}"
            )
        if not _VALUES.issuperset(fields[1:]):
            # one lowercase letter, or '?' (missing): any other value (a word, a capital, a
            # number) would become a category of its own and change the context width
            column, value = next((c, v) for c, v in enumerate(fields[1:]) if v not in _VALUES)
            raise DataError(
                f"{path}, line {lineno}: value {value!r} of attribute "
                f"{MUSHROOM_ATTRIBUTES[column]!r} is not one lowercase letter or '?' "
                "(the UCI file's categories)"
            )
        edible.append(_CLASSES[fields[0]])
        rows.append(fields[1:])
    if not rows:
        raise DataError(f"{path} holds no data rows")
    return np.asarray(edible, dtype=bool), np.asarray(rows, dtype=str)


def _one_hot(attributes: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One-hot encode (N, 22) category letters: float32 (N, F) and the F feature names."""
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for j, attribute in enumerate(MUSHROOM_ATTRIBUTES):
        categories, codes = np.unique(attributes[:, j], return_inverse=True)
        block = np.zeros((attributes.shape[0], categories.size), dtype=np.float32)
        block[np.arange(attributes.shape[0]), codes.reshape(-1)] = 1.0
        blocks.append(block)
        names.extend(f"{attribute}={category}" for category in categories)
    return np.concatenate(blocks, axis=1), names


def load_mushroom(
    data_dir: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> Mushroom:
    """Load and one-hot encode the UCI Mushroom data set.

    Args:
        data_dir: data directory (the file is looked up in ``<data-dir>/mushroom/`` and
            ``<data-dir>/``), or the path of ``agaricus-lepiota.data`` itself; None resolves the
            directory with `resolve_data_dir`.
        verify: check the file's SHA-256 against the known digest of the UCI file.

    Returns:
        `Mushroom` with ``contexts`` float32 (8124, 117) and ``edible`` bool (8124,).

    Raises:
        MissingDataError: file not found; ChecksumError: digest mismatch;
        DataError: malformed row (the message names the line).
    """
    path = _find_file(data_dir)
    if verify:
        verify_file(path, MUSHROOM_SHA256[MUSHROOM_FILE], source_hint=MUSHROOM_SOURCE)
    edible, attributes = _parse(path)
    contexts, names = _one_hot(attributes)
    return Mushroom(
        contexts=torch.from_numpy(contexts),
        edible=torch.from_numpy(edible),
        feature_names=names,
        path=path,
    )
