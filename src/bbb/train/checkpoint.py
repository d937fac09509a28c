"""Atomic, resumable checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over its final name (``os.replace`` is atomic on POSIX), so a crash or ``kill -9`` at any
moment leaves either the old file or the new one, never a half-written one. The last two epoch
checkpoints are kept (``checkpoint-<epoch>.pt``); loading falls back to the older one when the
newest is corrupt, and says so.

Checkpoints are loaded with ``torch.load(weights_only=True)``: they hold only tensors, numbers,
strings and containers of them, and loading never executes code.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import socket
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "finite_json",
    "strict_json",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_epoch",
    "latest_checkpoint",
    "list_checkpoints",
    "rng_state",
    "set_rng_state",
    "check_writable",
    "make_dirs",
    "RunLock",
    "RunLockedError",
]

_UMASK = os.umask(0)
os.umask(_UMASK)
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt (the message names the file)."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0o600; give the file the mode an ordinary open() would (umask).
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(value: Any) -> Any:
    """``value`` for :func:`json.dumps` with every non-finite float (NaN, +-Infinity) as None.

    Dictionaries, lists and tuples are copied recursively and tensors become (nested) lists;
    anything else is returned as is. The ``default`` hook of :func:`json.dumps` cannot do
    this: it is never called for floats, which are written as the non-standard ``NaN`` /
    ``Infinity`` that strict JSON readers reject.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return finite_json(value.tolist())
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def strict_json(value: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """``value`` as strict JSON text: non-finite floats as ``null`` (:func:`finite_json`),
    any other object JSON does not know as its ``str()``."""
    return json.dumps(
        finite_json(value), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str
    )


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(directory: str | os.PathLike[str]) -> None:
    """``mkdir -p directory``, durably: each directory it creates is fsync'ed into its parent.

    A file fsync'ed inside a new directory is not on disk until the new directory's own entry
    is (POSIX requires an fsync of the parent for that): a power cut after the first epoch
    could otherwise lose ``checkpoints/`` with the checkpoint in it.
    """
    directory = Path(directory)
    missing = []
    for p in (directory, *directory.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):  # outermost first
        try:
            p.mkdir()
        except FileExistsError:
            if not p.is_dir():
                raise
            continue  # created meanwhile by another process: its creator syncs it
        _fsync_dir(p.parent)


def check_writable(directory: str | os.PathLike[str], need_bytes: int = 1 << 20) -> None:
    """Fail early, with a clear message, when ``directory`` cannot hold a run's files.

    Creates the directory, writes and removes a probe file of ``need_bytes`` bytes.
    """
    directory = Path(directory)
    for p in (directory, *directory.parents):
        if p.exists():
            if not p.is_dir():
                what = "is" if p == directory else f"is under {p}, which is"
                raise OSError(
                    f"run directory {directory} {what} a file, not a directory: "
                    "choose another --out"
                )
            break
    try:
        make_dirs(directory)
        fd, tmp = tempfile.mkstemp(prefix=".write-probe.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * need_bytes)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise OSError(
            f"run directory {directory} is not writable ({e.strerror or e}): "
            "choose another --out, free disk space or fix its permissions"
        ) from e


def remove_stale_temporaries(out_dir: str | os.PathLike[str]) -> None:
    """Delete the temporary files of atomic writes that a killed run left in ``out_dir`` and
    its ``checkpoints/`` (never read). Call it only while holding the directory's
    :class:`RunLock`: another process's write in progress would lose its file."""
    out = Path(out_dir)
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            for p in [*d.glob(".*.tmp"), *d.glob(".write-probe.*")]:
                with contextlib.suppress(OSError):
                    p.unlink()


def rng_state() -> dict[str, Any]:
    """The global torch (CPU and, where initialised, every CUDA device's) and Python RNG
    states, in a ``weights_only``-loadable form."""
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        # the weight noise of large tensors is drawn in one chunk per thread (bbb.nn.noise),
        # so an exact resume needs the same thread count: recorded, checked on restore
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (the states may have been loaded onto any device:
    the generators take CPU byte tensors)."""
    torch.set_rng_state(state["torch"].cpu())
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    threads = state.get("threads")
    if threads is not None and int(threads) != torch.get_num_threads():
        warnings.warn(
            f"the checkpoint was written with {int(threads)} thread(s), this process has "
            f"{torch.get_num_threads()}: the resumed run is statistically the same but not "
            "bit-identical to an uninterrupted one (the weight noise is drawn in one chunk per "
            f"thread, and matrix products round differently); set OMP_NUM_THREADS={int(threads)} "
            "to continue it exactly",
            stacklevel=2,
        )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[:n]])


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Epoch checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_epoch(path: str | os.PathLike[str]) -> int:
    """The epoch an epoch checkpoint's file name records (``checkpoint-00003.pt`` -> 3)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named like an epoch checkpoint")
    return int(m.group(1))


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest epoch checkpoint, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | os.PathLike[str], epoch: int, state: dict[str, Any], keep: int = KEEP
) -> Path:
    """Atomically write ``state`` as ``checkpoint-<epoch>.pt``; keep the newest ``keep``."""
    directory = Path(directory)
    make_dirs(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = directory / f"checkpoint-{epoch:05d}.pt"
    atomic_write_bytes(path, buf.getvalue())
    for old in list_checkpoints(directory)[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
    return path


def _load_one(
    path: Path, map_location: str | torch.device | None, require: Sequence[str] = ()
) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # torch.load does not verify the zip members' CRC-32: a flipped bit in tensor data would
        # load silently. testzip() reads every member and checks it (~1 GB/s).
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: CRC mismatch in member {bad}")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means a bad file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a bbb checkpoint dictionary")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a bbb training checkpoint (no {', '.join(missing)})"
        )
    return state


def load_checkpoint(
    path_or_dir: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    *,
    require: Sequence[str] = (),
) -> tuple[dict[str, Any], Path]:
    """Load a checkpoint file, or the newest good one of a directory.

    In a directory, a corrupt newest checkpoint is reported with a warning naming it and the
    previous one is used; if none is readable, :class:`CheckpointError` names each file tried.
    ``require``: keys the checkpoint must hold (a file without them counts as unreadable).
    """
    p = Path(path_or_dir)
    if p.is_dir():
        candidates = list(reversed(list_checkpoints(p)))
        if not candidates:
            raise CheckpointError(f"no checkpoint-*.pt found in {p}")
        errors = []
        for c in candidates:
            try:
                state = _load_one(c, map_location, require)
            except CheckpointError as e:
                errors.append(str(e))
                warnings.warn(f"{e}; trying an older checkpoint", stacklevel=2)
                continue
            return state, c
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
    return _load_one(p, map_location, require), p


class RunLockedError(RuntimeError):
    """Another process is training into the same run directory."""


try:  # POSIX advisory locks; elsewhere (Windows) RunLock does nothing
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - not on the supported platforms
    _fcntl = None  # type: ignore[assignment]

_HELD_LOCKS: set[str] = set()  # directories (resolved) this process holds the lock of


class RunLock:
    """An exclusive lock on a run directory, held while a process trains into it.

    Two processes writing one run (a job requeued while the old one still runs, a second
    ``bbb train --resume`` by mistake) would interleave their metrics rows and overwrite each
    other's checkpoints; the second one is refused with :class:`RunLockedError`, which names
    the holder. The lock is ``flock`` on ``RUN_DIR/.lock`` (released by the kernel when the
    process dies, so a killed run never leaves a stale lock); it is re-entrant within one
    process, and a no-op where ``fcntl`` is missing. Like every ``flock``, it may not be
    enforced across machines on some network file systems.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        self._fd: int | None = None  # set by the outermost holder; nested holders do nothing
        if _fcntl is None or self._key in _HELD_LOCKS:
            return
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path} is in use: {holder} is training into it. Wait for it to finish "
                "or stop it first (two processes writing one run would mix their checkpoints "
                "and metrics)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        _HELD_LOCKS.add(self._key)

    def release(self) -> None:
        """Release the lock if this holder took it (idempotent; nested holders do nothing)."""
        if self._fd is not None:
            _HELD_LOCKS.discard(self._key)
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
