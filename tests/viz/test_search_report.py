"""Search result pictures: labelled queries get right/wrong frames, bare image queries are said to be unmarked,
and a PNG grid that leaves queries out says so in the picture and on the console."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from medsim.viz.search_report import Case, search_html, search_png

GREEN, RED = (34, 170, 34), (204, 51, 51)


def _cases(sample_root, label):
    imgs = [str(p) for p in sorted((sample_root / "derm" / "images").glob("*.png"))[:3]]
    queries = [Case(i, label) for i in imgs]
    hits = [[Case(imgs[0], "a", 0.9), Case(imgs[1], "b", 0.5)] for _ in imgs]
    return queries, hits


def _frames(px, rows):
    """Colour of the frame corner of each hit cell (136 px cells, 164 px rows)."""
    return {tuple(px[164 * r + 1, 136 * c + 1]) for r in range(rows) for c in (1, 2)}


def test_labelled_queries_mark_hits_and_bare_queries_say_they_are_unmarked(sample_root, tmp_path):
    q, hits = _cases(sample_root, "a")
    with Image.open(search_png(q, hits, tmp_path / "l.png")) as im:
        assert im.size == (3 * 136, 3 * 164)  # no note line
        assert _frames(np.asarray(im.convert("RGB")), 3) == {GREEN, RED}
    page = search_html(q, hits, tmp_path / "l.html").read_text()
    assert "Green frame" in page and "not marked" not in page and 'class="hit"' in page

    q, hits = _cases(sample_root, None)
    with Image.open(search_png(q, hits, tmp_path / "u.png")) as im:
        assert im.size == (3 * 136, 3 * 164 + 20)  # one note line under the grid
        px = np.asarray(im.convert("RGB"))
    assert not _frames(px, 3) & {GREEN, RED}
    assert (px[3 * 164:] > 200).any()  # the note is drawn
    page = search_html(q, hits, tmp_path / "u.html").read_text()
    assert "Unlabelled queries: hits not marked" in page and "Green frame" not in page
    assert 'class="hit"' not in page and 'class="miss"' not in page

    q[0].label = "a"  # mixed: the labelled query is marked, the page says how many are not
    page = search_html(q, hits, tmp_path / "m.html").read_text()
    assert "2 of 3 queries unlabelled: their hits not marked" in page and 'class="hit"' in page


def test_png_row_cut_is_said_on_the_console(sample_root, tmp_path, caplog):
    q, hits = _cases(sample_root, "a")
    with caplog.at_level(logging.WARNING, logger="medsim"):
        search_png(q, hits, tmp_path / "g.png", max_rows=2)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'g.png'}: the grid shows the first 2 of 3 queries; write an .html page to see all of them"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsim"):
        search_png(q, hits, tmp_path / "g.png", max_rows=3)
    assert caplog.records == []
