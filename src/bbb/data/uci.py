"""UCI regression benchmarks in the split format of Hernandez-Lobato & Adams (2015).

A data-set directory holds:

* ``data.txt``: whitespace-separated numeric rows (features and target together; blank lines
  are skipped, as ``numpy.loadtxt`` does in the reference code);
* ``index_features.txt``, ``index_target.txt``: 0-based column indices (one target column);
* ``index_train_<i>.txt``, ``index_test_<i>.txt``: 0-based row indices of split ``i``;
* optionally ``n_splits.txt``, ``n_hidden.txt``, ``n_epochs.txt`` (one integer each).

The loader accepts any directory in this format (also the layout of the reference repository,
``<name>/data/data.txt``). Features and targets are standardised with the mean and the
population standard deviation of the *training* rows only; a constant training column gets
standard deviation 1.

Units: a model trained on a `UCISplit` predicts normalised targets. For a predictive mean ``m``
and standard deviation ``s`` in normalised units, the original units are
``m * y_std + y_mean`` and ``s * y_std`` (`UCISplit.denormalize_y`, `UCISplit.denormalize_std`),
and a log-likelihood density in original units is the normalised one minus ``log(y_std)`` per
data point (`UCISplit.log_likelihood_to_original`). RMSE scales by ``y_std``.

Checksums: files of a directory whose name is in the known table (the shared copies:
bostonHousing, concrete, energy, kin8nm, power-plant, wine-quality-red) are verified against
their SHA-256 (`UCIDataset`: the data, the index files and ``n_splits.txt``, ``n_hidden.txt``,
``n_epochs.txt``; `uci_info` verifies nothing); files of other directories are read unverified.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .._text import read_text
from .checksums import (
    UCI_SHA256,
    UCI_SOURCE,
    DataError,
    MissingDataError,
    require_file,
    resolve_data_dir,
    verify_file,
)

__all__ = [
    "UCIDataset",
    "UCIInfo",
    "UCISplit",
    "count_splits",
    "dataset_name",
    "find_uci_datasets",
    "is_uci_dir",
    "load_uci",
    "uci_info",
]

DEFAULT_N_SPLITS = 20
DEFAULT_N_HIDDEN = 50
DEFAULT_N_EPOCHS = 40
_REQUIRED = ("data.txt", "index_features.txt", "index_target.txt")
_SETTINGS = ("n_splits.txt", "n_hidden.txt", "n_epochs.txt")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class UCIInfo:
    """Metadata of one UCI split directory.

    Attributes:
        name: data-set name (the directory name; its parent's for a ``<name>/data/`` layout).
        path: the directory holding ``data.txt``.
        n_splits: number of train/test splits (``n_splits.txt``; else the number of
            ``index_train_<i>.txt`` files; else 20).
        n_hidden: hidden units of the reference experiments (``n_hidden.txt``, else 50).
        n_epochs: training epochs of the reference experiments (``n_epochs.txt``, else 40).
        n_rows: number of data rows.
        n_features: number of feature columns.
    """

    name: str
    path: Path
    n_splits: int
    n_hidden: int
    n_epochs: int
    n_rows: int
    n_features: int


@dataclass(frozen=True, eq=False)
class UCISplit:
    """One normalised train / (validation) / test split.

    Attributes:
        name: data-set name.
        split: split index.
        train, val, test: `TensorDataset` of ``(x, y)``, ``x`` float (N, D) and ``y`` float
            (N, 1), both normalised with the training statistics; ``val`` is None unless a
            validation fraction was requested.
        x_mean, x_std: feature statistics of the training part, shape (D,), original units.
        y_mean, y_std: target statistics of the training part, shape (1,), original units.
        train_index, val_index, test_index: int64 row indices into ``data.txt``.
    """

    name: str
    split: int
    train: TensorDataset
    val: TensorDataset | None
    test: TensorDataset
    x_mean: Tensor
    x_std: Tensor
    y_mean: Tensor
    y_std: Tensor
    train_index: Tensor
    val_index: Tensor | None
    test_index: Tensor

    @property
    def n_features(self) -> int:
        """Number of input features D."""
        return int(self.x_mean.shape[0])

    def normalize_x(self, x: Tensor) -> Tensor:
        """Features (..., D) in original units -> normalised."""
        return (x - self.x_mean.to(x)) / self.x_std.to(x)

    def normalize_y(self, y: Tensor) -> Tensor:
        """Targets in original units -> normalised (any shape broadcasting with (1,))."""
        return (y - self.y_mean.to(y)) / self.y_std.to(y)

    def denormalize_y(self, mean: Tensor) -> Tensor:
        """Normalised targets or predictive means -> original units: ``mean * y_std + y_mean``."""
        return mean * self.y_std.to(mean) + self.y_mean.to(mean)

    def denormalize_std(self, std: Tensor) -> Tensor:
        """Normalised predictive standard deviations -> original units: ``std * y_std``."""
        return std * self.y_std.to(std)

    def log_likelihood_to_original(self, log_lik: Tensor | float) -> Tensor | float:
        """Per-point log-density in normalised units -> original units (``- log(y_std)``)."""
        return log_lik - math.log(float(self.y_std.item()))


# --------------------------------------------------------------------------- parsing


def _read_text(path: Path) -> str:
    """``path``'s text; a file that is not text (binary, another encoding) is a `DataError`
    naming it, not a bare UnicodeDecodeError."""
    return read_text(path, DataError, hint="corrupt, or not in the UCI split format")


def _number(token: str) -> float:
    """``token`` as a float, read as numpy.loadtxt (the reference code's reader) reads it:
    Python's float() also takes digit separators ("1_000") and non-ASCII digits, which
    loadtxt refuses; ValueError for those and for anything float() refuses."""
    if not token.isascii() or "_" in token:
        raise ValueError(f"not a number: {token!r}")
    return float(token)


def _numbers(line: str, tokens: list[str]) -> list[float]:
    """The tokens of one line as floats (`_number`'s rules, checked once per line)."""
    if not line.isascii() or "_" in line:
        return [_number(t) for t in tokens]
    return [float(t) for t in tokens]


def _bad_token(tokens: list[str]) -> int:
    """Position of the first token `_number` refuses."""
    for column, token in enumerate(tokens):
        try:
            _number(token)
        except ValueError:
            return column
    raise AssertionError("no bad token")  # pragma: no cover


def _read_matrix(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a whitespace-separated numeric file.

    Returns:
        ``(values, line_numbers)``: float64 (R, C) and the 1-based file line of each row.
    """
    rows: list[list[float]] = []
    lines: list[int] = []
    width: int | None = None
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if width is None:
            width = len(tokens)
        elif len(tokens) != width:
            raise DataError(f"{path}, line {lineno}: expected {width} columns, got {len(tokens)}")
        try:
            rows.append(_numbers(line, tokens))
        except ValueError:
            column = _bad_token(tokens)
            raise DataError(
                f"{path}, line {lineno}, column {column}: non-numeric value {tokens[column]!r}"
            ) from None
        lines.append(lineno)
    if not rows:
        raise DataError(f"{path} holds no data rows")
    return np.asarray(rows, dtype=np.float64), np.asarray(lines)


def _read_indices(path: Path) -> np.ndarray:
    """0-based integer indices, one or more per line (written as ints or integral floats)."""
    path = require_file(path, UCI_SOURCE)
    values: list[int] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        for token in line.split():
            try:
                value = _number(token)
            except ValueError as exc:
                raise DataError(f"{path}, line {lineno}: not an index: {token!r}") from exc
            if not value.is_integer():
                raise DataError(f"{path}, line {lineno}: not an integer index: {token!r}")
            values.append(int(value))
    if not values:
        raise DataError(f"{path} lists no indices")
    return np.asarray(values, dtype=np.int64)


def _check_bounds(index: np.ndarray, size: int, path: Path, what: str) -> None:
    """Raise `DataError` if any index is outside [0, size)."""
    bad = index[(index < 0) | (index >= size)]
    if bad.size:
        raise DataError(
            f"{path}: {what} index {int(bad[0])} out of bounds (valid: 0..{size - 1}; "
            f"{bad.size} bad entries)"
        )


def _read_int(path: Path, default: int) -> int:
    """The single positive integer in ``path`` (``n_splits.txt``, ``n_hidden.txt``,
    ``n_epochs.txt``; written as ``50`` or ``50.0``), or ``default`` when the file is absent."""
    if not path.is_file():
        return default
    text = _read_text(path).strip()
    try:
        value = _number(text)
    except ValueError:
        value = math.nan
    if not (value.is_integer() and value >= 1):
        raise DataError(f"{path}: expected one positive integer, got {text[:40]!r}")
    return int(value)


def _count_rows(path: Path) -> int:
    """Number of non-blank lines of ``path``."""
    return sum(1 for line in _read_text(path).splitlines() if line.strip())


# --------------------------------------------------------------------------- directories


def is_uci_dir(path: PathLike) -> bool:
    """Whether ``path`` holds ``data.txt``, the two column-index files and split 0."""
    path = Path(path)
    return all((path / name).is_file() for name in (*_REQUIRED, "index_train_0.txt"))


def find_uci_datasets(root: PathLike) -> list[Path]:
    """Every directory at or below ``root`` in the split format, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"{root} is not a directory")
    found = {p.parent for p in root.rglob("data.txt") if is_uci_dir(p.parent)}
    return sorted(found)


def _resolve_dir(path: PathLike, data_dir: PathLike | None) -> Path:
    """Directory holding ``data.txt`` for a path or a bare name under ``<data-dir>/uci/``."""
    given = Path(path).expanduser()
    if given.name == "data.txt" and given.is_file():  # the data file itself: its directory
        return given.parent
    candidates = [given]
    root: Path | None = None
    if not given.is_dir() and not given.is_absolute() and len(given.parts) == 1:
        root = resolve_data_dir(data_dir)
        candidates = [root / "uci" / given, root / given]
    for candidate in candidates:
        for directory in (candidate, candidate / "data"):
            if (directory / "data.txt").is_file():
                return directory
        if candidate.is_dir():
            missing = candidate / "data.txt"
            raise MissingDataError(
                f"{missing} does not exist (not a UCI split directory). "
                f"Get the data from {UCI_SOURCE}."
            )
    tried = ", ".join(str(c) for c in candidates)
    available = "" if root is None else _available_names(root / "uci", str(given))
    raise MissingDataError(
        f"UCI data set {str(path)!r} not found (tried {tried}).{available} "
        f"Get it from {UCI_SOURCE}."
    )


def _available_names(root: Path, name: str) -> str:
    """`` Did you mean ...? Available under ROOT: ...`` for the data sets under ``root``."""
    import difflib

    try:
        names = sorted({dataset_name(d) for d in find_uci_datasets(root)}, key=str.lower)
    except (OSError, DataError):  # no uci/ folder (MissingDataError is a DataError) or unreadable
        return f" No UCI data sets found under {root}."
    if not names:
        return f" No UCI data sets found under {root}."
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    hint = f" Did you mean {by_lower[close[0]]!r}?" if close else ""
    return f"{hint} Available under {root}: {', '.join(names)}."


def dataset_name(directory: Path) -> str:
    """Name of the data set in ``directory`` (its parent's name for ``<name>/data``)."""
    return directory.parent.name if directory.name == "data" else directory.name


def count_splits(directory: Path) -> int:
    """``n_splits.txt``, else the number of consecutive ``index_train_<i>.txt`` files, else 20."""
    n_file = directory / "n_splits.txt"
    if n_file.is_file():
        return _read_int(n_file, DEFAULT_N_SPLITS)
    n = 0
    while (directory / f"index_train_{n}.txt").is_file():
        n += 1
    return n or DEFAULT_N_SPLITS


def uci_info(path: PathLike, *, data_dir: PathLike | None = None) -> UCIInfo:
    """Metadata of a split directory (a path, or a name under ``<data-dir>/uci/``).

    Reads only the small text files and counts the rows of ``data.txt``; verifies nothing.
    """
    directory = _resolve_dir(path, data_dir)
    return UCIInfo(
        name=dataset_name(directory),
        path=directory,
        n_splits=count_splits(directory),
        n_hidden=_read_int(directory / "n_hidden.txt", DEFAULT_N_HIDDEN),
        n_epochs=_read_int(directory / "n_epochs.txt", DEFAULT_N_EPOCHS),
        n_rows=_count_rows(directory / "data.txt"),
        n_features=int(_read_indices(directory / "index_features.txt").size),
    )


# --------------------------------------------------------------------------- loading


def _stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and population std (ddof 0) of (N, K) values; constant columns get std 1."""
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    constant = values.max(axis=0) == values.min(axis=0)
    std[constant | (std == 0)] = 1.0
    return mean, std


class UCIDataset:
    """A UCI split directory, parsed once; `split` gives normalised splits.

    Args:
        path: the directory, or a bare data-set name looked up in ``<data-dir>/uci/``.
        data_dir: data directory for bare names (see `resolve_data_dir`).
        verify: check SHA-256 digests of files listed in the known table (shared copies);
            directories with other names are never verified.

    Attributes:
        path: directory holding ``data.txt``; ``name``: data-set name; ``info``: `UCIInfo`.
        features: float64 (N, D) raw features; ``targets``: float64 (N,) raw targets.
    """

    def __init__(
        self, path: PathLike, *, data_dir: PathLike | None = None, verify: bool = True
    ) -> None:
        self.path = _resolve_dir(path, data_dir)
        self.name = dataset_name(self.path)
        self.verify = verify
        for name in _REQUIRED:
            self._checked(name)
        data_path = self.path / "data.txt"
        values, lines = _read_matrix(data_path)
        feat_path, target_path = self.path / "index_features.txt", self.path / "index_target.txt"
        feature_cols = _read_indices(feat_path)
        target_cols = _read_indices(target_path)
        _check_bounds(feature_cols, values.shape[1], feat_path, "column")
        _check_bounds(target_cols, values.shape[1], target_path, "column")
        if target_cols.size != 1:
            raise DataError(f"{target_path}: expected one target column, got {target_cols.size}")
        cols, counts = np.unique(feature_cols, return_counts=True)
        if (counts > 1).any():
            # a repeated column would be a second, identical input feature
            raise DataError(
                f"{feat_path}: column {int(cols[counts > 1][0])} listed more than once "
                f"({int((counts > 1).sum())} repeated columns)"
            )
        if np.isin(target_cols, feature_cols).any():
            raise DataError(
                f"{target_path}: target column {int(target_cols[0])} is also "
                f"listed in {feat_path.name}"
            )
        used = np.concatenate([feature_cols, target_cols])
        _check_finite(values[:, used], lines, used, data_path)
        self.features = values[:, feature_cols]
        self.targets = values[:, target_cols[0]]
        for name in _SETTINGS:  # optional; when present they set the splits and the network
            if (self.path / name).is_file():
                self._checked(name)
        self.info = UCIInfo(
            name=self.name,
            path=self.path,
            n_splits=count_splits(self.path),
            n_hidden=_read_int(self.path / "n_hidden.txt", DEFAULT_N_HIDDEN),
            n_epochs=_read_int(self.path / "n_epochs.txt", DEFAULT_N_EPOCHS),
            n_rows=values.shape[0],
            n_features=int(feature_cols.size),
        )

    @property
    def n_splits(self) -> int:
        """Number of train/test splits."""
        return self.info.n_splits

    def __len__(self) -> int:
        """Number of data rows."""
        return self.info.n_rows

    def __repr__(self) -> str:
        return f"UCIDataset({self.name!r}, rows={len(self)}, splits={self.n_splits})"

    def _checked(self, filename: str) -> Path:
        """``path/filename``, required to exist, verified if its digest is known."""
        path = require_file(self.path / filename, UCI_SOURCE)
        expected = UCI_SHA256.get(self.name, {}).get(filename)
        if self.verify and expected is not None:
            verify_file(path, expected, source_hint=UCI_SOURCE)
        return path

    def split_indices(self, split: int) -> tuple[np.ndarray, np.ndarray]:
        """Row indices ``(train, test)`` of split ``split``, validated."""
        n = self.n_splits
        if isinstance(split, bool) or not isinstance(split, (int, np.integer)):
            raise TypeError(f"split must be an int, got {type(split).__name__}")
        if not 0 <= split < n:
            raise ValueError(
                f"split {split} out of range for {self.name}: "
                f"valid splits are 0..{n - 1} ({n} splits)"
            )
        result = []
        for part in ("train", "test"):
            path = self._checked(f"index_{part}_{split}.txt")
            index = _read_indices(path)
            _check_bounds(index, len(self), path, "row")
            rows, counts = np.unique(index, return_counts=True)
            if (counts > 1).any():
                # a repeated row would count twice in training or in the test metrics
                raise DataError(
                    f"{path}: {int((counts > 1).sum())} rows listed more than once "
                    f"(e.g. row {int(rows[counts > 1][0])})"
                )
            result.append(index)
        overlap = np.intersect1d(result[0], result[1])
        if overlap.size:
            raise DataError(
                f"{self.path}: split {split} has {overlap.size} rows in both "
                f"train and test (e.g. row {int(overlap[0])})"
            )
        return result[0], result[1]

    def split(
        self,
        split: int,
        *,
        validation_fraction: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> UCISplit:
        """Normalised split ``split``; see `load_uci`."""
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        train_idx, test_idx = self.split_indices(split)
        val_idx: np.ndarray | None = None
        if validation_fraction > 0:
            train_idx, val_idx = _carve_validation(train_idx, validation_fraction, seed)
        x_mean, x_std = _stats(self.features[train_idx])
        y_mean, y_std = _stats(self.targets[train_idx, None])

        def part(index: np.ndarray) -> TensorDataset:
            x = (self.features[index] - x_mean) / x_std
            y = (self.targets[index, None] - y_mean) / y_std
            return TensorDataset(_tensor(x, dtype), _tensor(y, dtype))

        return UCISplit(
            name=self.name,
            split=int(split),
            train=part(train_idx),
            val=None if val_idx is None else part(val_idx),
            test=part(test_idx),
            x_mean=_tensor(x_mean, dtype),
            x_std=_tensor(x_std, dtype),
            y_mean=_tensor(y_mean, dtype),
            y_std=_tensor(y_std, dtype),
            train_index=torch.from_numpy(train_idx.copy()),
            val_index=None if val_idx is None else torch.from_numpy(val_idx.copy()),
            test_index=torch.from_numpy(test_idx.copy()),
        )


def _tensor(values: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A contiguous tensor copy of ``values`` with ``dtype``."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)


def _check_finite(values: np.ndarray, lines: np.ndarray, cols: np.ndarray, path: Path) -> None:
    """Raise `DataError` naming the first NaN / infinite entry (file line and column)."""
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{path}, line {int(lines[row])}, column {int(cols[col])}: "
            f"non-finite value {values[row, col]} ({int(bad.sum())} in total)"
        )


def _carve_validation(
    train_idx: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training rows at random (seeded) into ``(train, val)``, keeping file order."""
    n_val = max(1, round(fraction * train_idx.size))
    if n_val >= train_idx.size:
        raise ValueError(
            f"validation_fraction {fraction} leaves no training rows ({train_idx.size} available)"
        )
    chosen = np.random.default_rng(seed).permutation(train_idx.size)[:n_val]
    mask = np.zeros(train_idx.size, dtype=bool)
    mask[chosen] = True
    return train_idx[~mask], train_idx[mask]


def load_uci(
    path: PathLike,
    split: int,
    *,
    validation_fraction: float = 0.0,
    seed: int = 0,
    data_dir: PathLike | None = None,
    verify: bool = True,
    dtype: torch.dtype = torch.float32,
) -> UCISplit:
    """Load split ``split`` of the UCI data set in ``path``, normalised with training statistics.

    Args:
        path: a split directory (any data set in the format), or a bare name such as
            ``"bostonHousing"`` looked up in ``<data-dir>/uci/``.
        split: split index in ``0..n_splits-1``.
        validation_fraction: if > 0, this fraction of the training rows (at least one) is held
            out at random as ``val``; statistics are then fit on the remaining training rows.
        seed: seed of the validation draw.
        data_dir: data directory for bare names.
        verify: check SHA-256 digests of files in the known table.
        dtype: floating dtype of the tensors.

    Returns:
        `UCISplit` with ``x`` (N, D) and ``y`` (N, 1) tensors and the statistics.

    Raises:
        ValueError: split out of range (the message gives the range) or bad fraction.
        MissingDataError: missing directory or file (named); DataError: malformed content.
    """
    dataset = UCIDataset(path, data_dir=data_dir, verify=verify)
    return dataset.split(split, validation_fraction=validation_fraction, seed=seed, dtype=dtype)
