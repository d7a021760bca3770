"""``medsim data inspect``: what a source holds — counts, classes, shapes, spacing, series, unreadable files."""

from __future__ import annotations

import os
from typing import Any

from medsim.data.sources import open_source
from medsim.data.validate import validate_source
from medsim.errors import BadItem

__all__ = ["inspect_source", "format_report"]


def inspect_source(path: str | os.PathLike, *, layout: str = "auto", decode: bool = True, progress: bool = True,
                   **options: Any) -> dict[str, Any]:
    """Read ``path`` leniently and (``decode``) open every file; return a JSON-able report."""
    src = open_source(path, layout=layout, lenient=True, **options)
    n_listed = len(src.items) + len(src.bad)  # every item and table row found, before anything is decoded
    result = validate_source(src, lenient=True, progress=progress) if decode else None
    groups = {k: len({it[k] for it in src.items if k in it}) for k in ("group", "patient", "study")}
    report: dict[str, Any] = {
        "path": str(path), "layout": src.layout, "kind": src.kind,
        "items": len(src.items), "listed": n_listed,
        "classes": src.class_counts(),
        "groups": {k: v for k, v in groups.items() if v},
        "unreadable": _unreadable_once(src.bad),
        "hidden": int(src.info.get("hidden", 0)),
    }
    if result is not None:
        report["shapes"] = {"x".join(map(str, k)): v for k, v in result.shapes.most_common()}
        if result.spacings:
            report["spacing"] = {"x".join(f"{s:g}" for s in k): v for k, v in result.spacings.most_common()}
    report.update({k: v for k, v in src.info.items() if k in ("series", "n_files", "slides", "table")})
    return report


def _unreadable_once(bad: list[BadItem]) -> list[str]:
    """One line per unreadable file (or table row): a file that fails for several items — a mask two rows
    share, a slice of a series — is listed, and counted, once."""
    seen: dict[tuple[str, int | None], str] = {}
    for b in bad:
        seen.setdefault((b.path, b.row), b.line())
    return list(seen.values())


def format_report(r: dict[str, Any]) -> str:
    """The report as aligned text tables for a terminal."""
    lines = [f"source   {r['path']}", f"layout   {r['layout']} ({r['kind']})",
             f"items    {r['items']} usable" + (f" of {r['listed']}" if r['listed'] != r['items'] else "")]
    if r.get("hidden"):
        lines.append(f"hidden   skipped {r['hidden']} hidden file(s)/folder(s) (.DS_Store, ._*, dot-folders)")
    if r.get("n_files") is not None:
        lines.append(f"files    {r['n_files']}")
    if r["classes"]:
        width = max(len(c) for c in r["classes"])
        total = sum(r["classes"].values()) or 1
        lines += ["", f"{'class':<{width}}  {'count':>7}  share"]
        lines += [f"{c:<{width}}  {n:>7}  {n / total:6.1%}" for c, n in r["classes"].items()]
    if r["groups"]:
        names = {"group": "lesions/groups", "patient": "patients", "study": "studies"}
        lines += ["", "groups   " + ", ".join(f"{v} {names.get(k, k)}" for k, v in r["groups"].items())]
    if r.get("shapes"):
        shapes = list(r["shapes"].items())
        lines += ["", "shapes   " + ", ".join(f"{s} ({n})" for s, n in shapes[:6])
                  + (f", … {len(shapes) - 6} more" if len(shapes) > 6 else "")]
    if r.get("spacing"):
        lines.append("spacing  " + ", ".join(f"{s} mm ({n})" for s, n in list(r["spacing"].items())[:6]))
    if r.get("series"):
        lines += ["", f"{'series':<7} {'files':>6}  {'shape':<14} {'spacing (mm)':<22} modality"]
        for i, s in enumerate(r["series"][:50]):
            lines.append(f"{i:<7} {s['files']:>6}  {'x'.join(map(str, s['shape'])):<14} "
                         f"{'x'.join(f'{v:g}' for v in s['spacing']):<22} {s['modality']}")
        if len(r["series"]) > 50:
            lines.append(f"… {len(r['series']) - 50} more series")
    if r["unreadable"]:
        lines += ["", f"unreadable ({len(r['unreadable'])}):"] + [f"  {u}" for u in r["unreadable"][:100]]
        if len(r["unreadable"]) > 100:
            lines.append(f"  … {len(r['unreadable']) - 100} more")
    return "\n".join(lines)
