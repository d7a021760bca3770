"""Errors medsim raises for bad input, and the report lenient mode writes.

Every bad-input error names *where* (file, and row/field for tables) and *why*, in one line, so the CLI can print
it and exit with code 2 without a traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["MedsimError", "DataError", "BadItem", "BadInputReport", "atomic_path", "atomic_write_text",
           "atomic_write_bytes"]


class MedsimError(Exception):
    """Base class of errors caused by the user's input or configuration (CLI exit code 2)."""


@dataclass
class BadItem:
    """One unusable input: the file (and table row / field) and the reason, as one line."""

    path: str
    reason: str
    row: int | None = None
    field: str | None = None

    def line(self) -> str:
        where = self.path
        if self.row is not None:
            where += f", row {self.row}"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}"


class DataError(MedsimError):
    """Bad input data: one or more files/rows cannot be used.

    ``items`` lists each problem; ``str(err)`` is one line per problem (a single line for a single problem).
    """

    def __init__(self, path: str | os.PathLike | None = None, reason: str = "", *, row: int | None = None,
                 field: str | None = None, items: Iterable[BadItem] | None = None, header: str | None = None):
        self.items: list[BadItem] = list(items) if items is not None else [
            BadItem(str(path), reason, row=row, field=field)]
        self.header = header
        super().__init__(self._message())

    #: at most this many problems are spelled out in the message; all stay in ``items``
    MAX_LINES = 25

    def _message(self) -> str:
        lines = [i.line() for i in self.items[: self.MAX_LINES]]
        if len(self.items) > self.MAX_LINES:
            lines.append(f"… and {len(self.items) - self.MAX_LINES} more (lenient mode writes them all to a report)")
        if self.header:
            return "\n".join([self.header, *("  " + ln for ln in lines)])
        return "\n".join(lines)

    @property
    def reason(self) -> str:
        return self.items[0].reason if self.items else ""


@dataclass
class BadInputReport:
    """What lenient mode skipped: kept, printed and optionally written as JSON next to the run."""

    source: str
    total: int = 0
    skipped: list[BadItem] = field(default_factory=list)

    def add(self, item: BadItem) -> None:
        self.skipped.append(item)

    @property
    def ok(self) -> int:
        return self.total - len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "total": self.total, "usable": self.ok,
                "skipped": [asdict(s) for s in self.skipped]}

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    def summary(self) -> str:
        head = f"{len(self.skipped)} of {self.total} items skipped in {self.source}"
        return "\n".join([head, *("  " + s.line() for s in self.skipped)])


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Write ``path`` atomically: yields a temporary path in the same folder to write to; when the block ends
    without an error the file is fsynced and moved into place with ``os.replace``, so readers never see half a
    file. On any error (a full disk, a crash of the writer) the temporary file is removed and an ``OSError`` names
    ``path`` — the file the user asked for — not the temporary one; the previous ``path``, if any, is untouched.

    ``suffix`` keeps an extension some writers need (``.npz``, ``.onnx``, ``.nii.gz``) at the end of the name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            raise OSError(e.errno, f"cannot write it ({e.strerror or e})", str(path)) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path` (no half-written file, no temp file left)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
