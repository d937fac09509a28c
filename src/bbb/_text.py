"""Reading a small text file (config, space, data) with an error that names it."""

from __future__ import annotations

from pathlib import Path


def read_text(path: Path, error: type[Exception], *, what: str = "", hint: str = "") -> str:
    """``path``'s UTF-8 text. A file that is not (binary, damaged, another encoding) raises
    ``error`` naming it (``what`` in front: "config file"; ``hint`` after), not a bare
    ``UnicodeDecodeError`` that names no file. A byte-order mark, which Windows editors write
    at the start of UTF-8 files, is dropped (tomllib read it as an 'Invalid statement' at line
    1, column 1; a data file's first number did not parse)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        where = f"{what} {path}" if what else str(path)
        tail = f": {hint}" if hint else ""
        raise error(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}){tail}") from e
