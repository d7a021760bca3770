"""Errors medsim raises for bad input, and the report lenient mode writes.

Every bad-input error names *where* (file, and row/field for tables) and *why*, in one line, so the CLI can print
it and exit with code 2 without a traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["MedsimError", "DataError", "BadItem", "BadInputReport", "atomic_write_text"]


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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (no half-written file on a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
