"""Data sets of Blundell et al. (2015) and the usual Bayesian-deep-learning benchmarks.

Nothing is downloaded: every loader reads a data directory given explicitly (``--data-dir`` /
``data_dir=``), through ``BBB_DATA_DIR``, or found at ``../shared/data``, and verifies the
SHA-256 of what it reads where the digest is known.

* `toy_curve` / `load_toy`: the 1-D regression curve (section 5.2);
* `load_mnist`: MNIST with the 50000 / 10000 / 10000 protocol, pixels / 126;
* `load_uci` / `UCIDataset`: UCI regression splits of Hernandez-Lobato & Adams (2015);
* `load_mushroom`: the one-hot UCI Mushroom data set (contextual bandit, section 5.4).
"""

from __future__ import annotations

from .checksums import (
    DATA_DIR_ENV,
    ChecksumError,
    DataError,
    MissingDataError,
    clear_verification_cache,
    resolve_data_dir,
    sha256_of,
    verify_file,
)
from .mnist import MNIST_SPLITS, find_mnist_dir, load_mnist, parse_idx, read_idx
from .mushroom import MUSHROOM_ATTRIBUTES, Mushroom, load_mushroom
from .toy import ToyCurve, load_toy, toy_curve, toy_curve_function
from .uci import (
    UCIDataset,
    UCIInfo,
    UCISplit,
    find_uci_datasets,
    is_uci_dir,
    load_uci,
    uci_info,
)

__all__ = [
    "DATA_DIR_ENV",
    "MNIST_SPLITS",
    "MUSHROOM_ATTRIBUTES",
    "ChecksumError",
    "DataError",
    "MissingDataError",
    "Mushroom",
    "ToyCurve",
    "UCIDataset",
    "UCIInfo",
    "UCISplit",
    "clear_verification_cache",
    "find_mnist_dir",
    "find_uci_datasets",
    "is_uci_dir",
    "load_mnist",
    "load_mushroom",
    "load_toy",
    "load_uci",
    "parse_idx",
    "read_idx",
    "resolve_data_dir",
    "sha256_of",
    "toy_curve",
    "toy_curve_function",
    "uci_info",
    "verify_file",
]
