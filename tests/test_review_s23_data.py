"""Review session 23: data loading (MNIST IDX, checksums, mushroom, UCI split files).

Each test pins a defect found in the review and fixed in ``src/bbb/data``. Corrupted inputs
are copies under ``tmp_path``; the shared data directory is only read.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bbb.data import (
    ChecksumError,
    DataError,
    MissingDataError,
    UCIDataset,
    checksums,
    load_mnist,
    load_mushroom,
    parse_idx,
    verify_file,
)

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
MUSHROOM = SHARED / "mushroom" / "agaricus-lepiota.data"
BOSTON = SHARED / "uci" / "bostonHousing"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not depend on the caller's BBB_DATA_DIR or an earlier test's cache."""
    monkeypatch.delenv(checksums.DATA_DIR_ENV, raising=False)
    checksums.clear_verification_cache()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (set up ../shared/data)")
    return path


# --------------------------------------------------------------------------- checksums


def test_an_altered_copy_with_its_mtime_restored_is_hashed_again(tmp_path: Path) -> None:
    # cp -p, rsync -a, wget and curl -R set the modification time from the source: a
    # same-size altered file then had the verified version's (path, size, mtime) cache key
    # and passed verification without being read
    f = tmp_path / "a.bin"
    f.write_bytes(b"genuine content")
    good = checksums.sha256_of(f)
    assert verify_file(f, good) == good
    st = f.stat()
    f.write_bytes(b"altered content")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ChecksumError, match=f"expected {good}, got {checksums.sha256_of(f)}"):
        verify_file(f, good)


def test_a_broken_symbolic_link_is_named_with_its_target(tmp_path: Path) -> None:
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (mnist / f"{stem}.gz").symlink_to(tmp_path / "gone" / f"{stem}.gz")
    # the file a loader asks for: was "does not exist", though a link of that name is there
    with pytest.raises(MissingDataError, match="broken symbolic link") as info:
        load_mnist(tmp_path, split="train")
    assert str(tmp_path / "gone") in str(info.value)
    # one broken link among genuine files: the file asked for names its link
    if (SHARED / "mnist").is_dir():
        (mnist / "train-images-idx3-ubyte.gz").unlink()
        (mnist / "train-images-idx3-ubyte.gz").symlink_to(
            SHARED / "mnist" / "train-images-idx3-ubyte.gz"
        )
        with pytest.raises(MissingDataError, match="labels-idx1-ubyte.gz is a broken symbolic"):
            load_mnist(tmp_path, split="train")
    mushroom = tmp_path / "mushroom"
    mushroom.mkdir()
    (mushroom / "agaricus-lepiota.data").symlink_to("../moved/agaricus-lepiota.data")
    with pytest.raises(MissingDataError, match="broken symbolic link") as info:
        load_mushroom(tmp_path)
    assert str(tmp_path / "moved" / "agaricus-lepiota.data") in str(info.value)


# --------------------------------------------------------------------------- MNIST


def test_mnist_files_are_read_by_content_whatever_their_name(tmp_path: Path) -> None:
    # a browser that decompressed the download under its .gz name, and a gzip file that lost
    # its suffix: both failed verification (and, unverified, as "not a gzip file" / "bad magic
    # number '1f8b0808'") though their content is the genuine MNIST
    src = _need(SHARED / "mnist")
    reference = load_mnist(SHARED, split="test")
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    with gzip.open(src / "t10k-images-idx3-ubyte.gz", "rb") as fh:
        (mnist / "t10k-images-idx3-ubyte.gz").write_bytes(fh.read())  # raw, named .gz
    shutil.copy(src / "t10k-labels-idx1-ubyte.gz", mnist / "t10k-labels-idx1-ubyte")  # gzip
    for verify in (True, False):
        x, y = load_mnist(tmp_path, split="test", verify=verify).tensors
        assert torch.equal(x, reference.tensors[0]) and torch.equal(y, reference.tensors[1])


def test_an_idx_header_too_large_for_int64_is_reported_with_its_true_size() -> None:
    # the payload size was computed in int64: 2^31 * 2^31 * 4 wrapped to "0 payload bytes"
    data = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 2**31, 4) + b"x"
    with pytest.raises(DataError, match=f"\\({2**64} payload bytes\\)"):
        parse_idx(data)


def test_load_mnist_refuses_a_subset_scale_or_dtype_it_cannot_use() -> None:
    _need(SHARED / "mnist")
    # subset=True was one image; 2.5 failed in numpy's slicing with an unrelated message
    for subset in (True, 2.5):
        with pytest.raises(TypeError, match="subset must be an int"):
            load_mnist(SHARED, split="test", subset=subset)  # type: ignore[arg-type]
    # scale=inf made every pixel 0 silently
    with pytest.raises(ValueError, match="finite positive"):
        load_mnist(SHARED, split="test", scale=float("inf"))
    # an integer dtype failed in torch's div_ ("result type Float can't be cast ... Long")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_mnist(SHARED, split="test", dtype=torch.int64)
    x, _ = load_mnist(SHARED, split="test", subset=np.int64(3), scale=np.float64(255.0)).tensors
    assert x.shape == (3, 784) and float(x.max()) == 1.0


# --------------------------------------------------------------------------- mushroom


@pytest.mark.parametrize(("value", "attribute"), [("xx", "cap-shape"), ("X", "cap-shape")])
def test_a_mushroom_value_that_is_not_one_letter_is_named(
    tmp_path: Path, value: str, attribute: str
) -> None:
    # was read as a category of its own: a 118th column, silently
    lines = _need(MUSHROOM).read_text().splitlines()
    fields = lines[6].split(",")
    fields[1] = value
    lines[6] = ",".join(fields)
    f = tmp_path / "agaricus-lepiota.data"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"line 7: value '{value}' of attribute '{attribute}'"):
        load_mushroom(f, verify=False)
    # the genuine file, '?' included, still loads
    assert load_mushroom(SHARED).contexts.shape == (8124, 117)


# --------------------------------------------------------------------------- UCI


def _boston_copy(tmp_path: Path, name: str = "boston-copy") -> Path:
    d = tmp_path / name
    shutil.copytree(_need(BOSTON), d)
    return d


@pytest.mark.parametrize("cell", ["1_0", "\uff11\uff12", "abc"])
def test_a_uci_cell_numpy_loadtxt_refuses_is_named_with_its_line_and_column(
    tmp_path: Path, cell: str
) -> None:
    # float() read "1_0" as 10 and full-width digits as 12, where the reference code's
    # numpy.loadtxt refuses them; a non-numeric cell's message named no column
    d = _boston_copy(tmp_path)
    lines = (d / "data.txt").read_text().splitlines()
    tokens = lines[3].split()
    tokens[4] = cell
    lines[3] = " ".join(tokens)
    (d / "data.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"line 4, column 4: non-numeric value '{cell}'"):
        UCIDataset(d)
    other = _boston_copy(tmp_path, "other")
    UCIDataset(other).split_indices(0)  # the genuine copy loads
    (other / "index_test_0.txt").write_text("1_0\n")  # was row 10
    with pytest.raises(DataError, match="line 1: not an index: '1_0'"):
        UCIDataset(other).split_indices(0)


def test_a_feature_column_listed_twice_is_refused(tmp_path: Path) -> None:
    # was a second, identical input feature (14 inputs for boston's 13 columns)
    d = _boston_copy(tmp_path)
    cols = (d / "index_features.txt").read_text().split()
    (d / "index_features.txt").write_text("\n".join([*cols, cols[2]]) + "\n")
    with pytest.raises(DataError, match=f"column {cols[2]} listed more than once"):
        UCIDataset(d)


def test_the_mushroom_file_given_by_its_own_path_with_a_tilde_or_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "~/agaricus-lepiota.data" was taken for a data directory that "does not exist or is not a
    # directory" (a directory's "~" is expanded); a missing file was called a missing directory
    (tmp_path / "agaricus-lepiota.data").symlink_to(_need(MUSHROOM))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_mushroom("~/agaricus-lepiota.data").contexts.shape == (8124, 117)
    missing = tmp_path / "elsewhere" / "agaricus-lepiota.data"
    with pytest.raises(MissingDataError, match=f"^{missing} does not exist"):
        load_mushroom(missing)


@pytest.mark.parametrize("verify", [True, False])
def test_an_mnist_file_that_is_an_error_page_or_empty_says_so(tmp_path: Path, verify: bool) -> None:
    # a failed download that saved the server's HTML page under the .gz name; an empty file
    src = _need(SHARED / "mnist")
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    shutil.copy(src / "t10k-labels-idx1-ubyte.gz", mnist)
    page = mnist / "t10k-images-idx3-ubyte.gz"
    page.write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    error = ChecksumError if verify else DataError
    with pytest.raises(error, match="is neither a gzip file nor an IDX file .*<!DOCTYPE html>"):
        load_mnist(tmp_path, split="test", verify=verify)
    page.write_bytes(b"")
    with pytest.raises(error, match=f"{page} is empty"):
        load_mnist(tmp_path, split="test", verify=verify)


def test_a_folder_with_only_the_test_files_does_not_hide_a_complete_one(tmp_path: Path) -> None:
    # <data-dir>/mnist/ holding the t10k files only was taken for every split: the training
    # split failed with "train-images-idx3-ubyte.gz does not exist" though MNIST/raw/ has it
    src = _need(SHARED / "mnist")
    (tmp_path / "mnist").mkdir()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in src.glob("*-ubyte.gz"):
        (raw / f.name).symlink_to(f)
        if f.name.startswith("t10k"):
            (tmp_path / "mnist" / f.name).symlink_to(f)
    x, y = load_mnist(tmp_path, split="val", subset=4).tensors
    x_ref, y_ref = load_mnist(SHARED, split="val", subset=4).tensors
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert load_mnist(tmp_path, split="test", subset=4).tensors[1].shape == (4,)
