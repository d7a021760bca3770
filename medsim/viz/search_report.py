"""Similar-case search results as a self-contained HTML page: each query with its neighbours, labels and scores.

Images are embedded as base64 PNG thumbnails, so the page can be mailed or archived without the data folder.
A neighbour whose label matches the query's gets a green frame, otherwise red. Torch-free (PIL only).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Case", "search_html"]


@dataclass
class Case:
    """One image on the page: where it is, its label (may be unknown) and, for neighbours, the score."""

    uri: str
    label: str | None = None
    score: float | None = None


def _thumb(uri: str, size: int) -> str:
    from PIL import Image

    try:
        with Image.open(uri) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception as e:  # a missing/unreadable gallery image must not break the page
        return f'<div class="missing" title="{html.escape(str(e))}">unreadable</div>'
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(uri).name)}">'


def search_html(queries: Sequence[Case], neighbours: Sequence[Sequence[Case]], path: str | os.PathLike, *,
                title: str = "medsim similar cases", thumb: int = 128) -> Path:
    """Write the page to ``path`` (atomically) and return it. ``neighbours[i]`` are query i's hits, best first."""
    if len(queries) != len(neighbours):
        raise ValueError(f"got {len(queries)} queries but {len(neighbours)} neighbour lists")
    rows = []
    for q, hits in zip(queries, neighbours):
        cells = [f'<td class="query">{_thumb(q.uri, thumb)}<div>query: {html.escape(Path(q.uri).name)}</div>'
                 f'<div>{html.escape(q.label or "unlabelled")}</div></td>']
        for rank, h in enumerate(hits, start=1):
            cls = "" if q.label is None or h.label is None else ("hit" if h.label == q.label else "miss")
            cells.append(f'<td class="{cls}">{_thumb(h.uri, thumb)}<div>#{rank} {html.escape(h.label or "?")}</div>'
                         f'<div>score {h.score:.3f}</div></td>' if h.score is not None else
                         f'<td class="{cls}">{_thumb(h.uri, thumb)}<div>#{rank} {html.escape(h.label or "?")}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;background:#222;color:#eee}} td{{padding:4px;text-align:center;
vertical-align:top;font-size:12px;border:3px solid transparent}} td.query{{border-color:#888}}
td.hit{{border-color:#2a2}} td.miss{{border-color:#c33}} .missing{{width:{thumb}px;height:{thumb}px;
background:#444}}</style></head><body><h2>{html.escape(title)}</h2>
<p>Green frame: same label as the query; red: different. Scores are cosine similarities.</p>
<table>{''.join(rows)}</table></body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
