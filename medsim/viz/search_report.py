"""Similar-case search results as a self-contained HTML page: each query with its neighbours, labels and scores.

Images are embedded as base64 PNG thumbnails, so the page can be mailed or archived without the data folder.
A neighbour whose label matches the query's gets a green frame, otherwise red. :func:`search_png` draws the
same grid as one PNG. Torch-free (PIL only).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medsim.errors import atomic_write_text

__all__ = ["Case", "search_html", "search_png", "unlabelled_note"]

logger = logging.getLogger(__name__)


@dataclass
class Case:
    """One image on the page: where it is on this machine (None: not here), its label (may be unknown), for
    neighbours the score, and the name shown for it — an opaque case token, never the file name (file names can
    carry patient names or MRNs)."""

    uri: str | None
    label: str | None = None
    score: float | None = None
    name: str | None = None


def unlabelled_note(queries: Sequence[Case]) -> str | None:
    """What the pictures say when hits cannot be marked right/wrong: queries without a label (bare images)."""
    n = sum(q.label is None for q in queries)
    if not n:
        return None
    return ("unlabelled queries: hits not marked" if n == len(queries) else
            f"{n} of {len(queries)} queries unlabelled: their hits not marked")


def _thumb(uri: str | None, size: int, alt: str = "") -> str:
    from PIL import Image

    if uri is None:
        return '<div class="missing" title="the image is not on this machine">not here</div>'
    try:
        with Image.open(uri) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception as e:  # a missing/unreadable gallery image must not break the page
        return f'<div class="missing" title="{html.escape(str(e))}">unreadable</div>'
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def search_html(queries: Sequence[Case], neighbours: Sequence[Sequence[Case]], path: str | os.PathLike, *,
                title: str = "medsim similar cases", thumb: int = 128) -> Path:
    """Write the page to ``path`` (atomically) and return it. ``neighbours[i]`` are query i's hits, best first."""
    if len(queries) != len(neighbours):
        raise ValueError(f"got {len(queries)} queries but {len(neighbours)} neighbour lists")
    rows = []
    for q, hits in zip(queries, neighbours):
        cells = [f'<td class="query">{_thumb(q.uri, thumb, q.name or "query")}<div>query {html.escape(q.name or "")}</div>'
                 f'<div>{html.escape(q.label or "unlabelled")}</div></td>']
        for rank, h in enumerate(hits, start=1):
            cls = "" if q.label is None or h.label is None else ("hit" if h.label == q.label else "miss")
            cells.append(f'<td class="{cls}">{_thumb(h.uri, thumb, h.name or "")}<div>#{rank} {html.escape(h.label or "?")}</div>'
                         f'<div>score {h.score:.3f}</div></td>' if h.score is not None else
                         f'<td class="{cls}">{_thumb(h.uri, thumb, h.name or "")}<div>#{rank} {html.escape(h.label or "?")}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = unlabelled_note(queries)  # bare image queries: no label to compare a hit with
    legend = ("" if note and all(q.label is None for q in queries) else
              "Green frame: same label as the query; red: different. ") + (f"{note[0].upper()}{note[1:]}. " if note else "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;background:#222;color:#eee}} td{{padding:4px;text-align:center;
vertical-align:top;font-size:12px;border:3px solid transparent}} td.query{{border-color:#888}}
td.hit{{border-color:#2a2}} td.miss{{border-color:#c33}} .missing{{width:{thumb}px;height:{thumb}px;
background:#444}}</style></head><body><h2>{html.escape(title)}</h2>
<p>{legend}Scores are cosine similarities.</p>
<table>{''.join(rows)}</table></body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, page)


def _thumb_image(uri: str, size: int):
    """A (size, size) RGB tile with the image centred on it (dark gray with 'unreadable' when it cannot be read)."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (size, size), (68, 68, 68))
    try:
        if uri is None:
            raise FileNotFoundError("not on this machine")
        with Image.open(uri) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    except Exception:  # noqa: BLE001 - a missing/unreadable gallery image must not break the grid
        ImageDraw.Draw(tile).text((4, size // 2 - 6), "unreadable", fill=(230, 230, 230))
    return tile


def search_png(queries: Sequence[Case], neighbours: Sequence[Sequence[Case]], path: str | os.PathLike, *,
               thumb: int = 128, max_rows: int = 100) -> Path:
    """The result grid as one PNG (a row per query: the query, then its neighbours best first, each with rank,
    label and score under it; frames: gray query, green same label, red different). At most ``max_rows`` queries
    (the first ones; a last line, and a logged warning, say how many were left out — use the HTML page for all);
    queries without a label get a line saying their hits are not marked. Written atomically."""
    from PIL import Image, ImageDraw

    if len(queries) != len(neighbours):
        raise ValueError(f"got {len(queries)} queries but {len(neighbours)} neighbour lists")
    left_out = max(0, len(queries) - max_rows)
    if left_out:
        logger.warning("%s: the grid shows the first %d of %d queries; write an .html page to see all of them",
                       path, max_rows, len(queries))
    queries, neighbours = list(queries)[:max_rows], list(neighbours)[:max_rows]
    notes = [f"{left_out} more queries not shown (first {max_rows} only)"] if left_out else []
    note = unlabelled_note(queries)
    if note:
        notes.append(note)
    pad, text_h = 4, 28
    cols = 1 + max((len(h) for h in neighbours), default=0)
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + text_h
    footer = 16 * len(notes) + (4 if notes else 0)
    canvas = Image.new("RGB", (cols * cell_w, max(1, len(queries)) * cell_h + footer), (34, 34, 34))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(notes):
        draw.text((pad, max(1, len(queries)) * cell_h + 4 + 16 * i), text, fill=(238, 238, 238))
    for r, (q, hits) in enumerate(zip(queries, neighbours)):
        cells = [(q, "query", (136, 136, 136))]
        for rank, h in enumerate(hits, start=1):
            colour = (0, 0, 0) if q.label is None or h.label is None else (
                (34, 170, 34) if h.label == q.label else (204, 51, 51))
            cells.append((h, f"#{rank}", colour))
        for c, (case, tag, colour) in enumerate(cells):
            x, y = c * cell_w, r * cell_h
            canvas.paste(_thumb_image(case.uri, thumb), (x + pad, y + pad))
            if colour != (0, 0, 0):
                draw.rectangle([x + 1, y + 1, x + cell_w - 2, y + pad + thumb + pad - 2], outline=colour, width=3)
            line2 = case.label or ("unlabelled" if tag == "query" else "?")
            line1 = tag if case.score is None else f"{tag}  {case.score:.3f}"
            draw.text((x + pad, y + 2 * pad + thumb), line1, fill=(238, 238, 238))
            draw.text((x + pad, y + 2 * pad + thumb + 13), line2[:22], fill=(238, 238, 238))
    from medsim.viz.contact_sheet import save_png

    return save_png(canvas, path)
