"""What `medsim search` prints about the fp32 recheck (the search itself is stubbed: the recheck's numbers are
tested in tests/runtime/test_ties.py and, through OpenVINO, in tests/deploy/test_engine_openvino.py)."""

from __future__ import annotations

import pytest

from medsim.cli import main
from medsim.deploy import tasks


class _Hit:
    def __init__(self, i):
        self.id, self.score, self.record = i, 0.9, {"id": f"c-{i:016x}", "label": None}


@pytest.mark.parametrize("n, rechecked, margin, note, expect", [
    (12, 3, 1e-3, None, "fp32 recheck: 3 of 12 queries re-embedded in fp32"),
    (12, 9, 1e-3, None, "that is most of them: for this model --precision fp32 alone"),
    (12, 0, None, "no fp32 recheck: the index holds bf16 embeddings", "no fp32 recheck: the index holds bf16"),
    (12, 0, None, None, None),
])
def test_search_prints_the_recheck(tmp_path, monkeypatch, capsys, n, rechecked, margin, note, expect):
    images = []
    for i in range(n):
        p = tmp_path / f"q{i}.png"
        p.write_bytes(b"")
        images.append(str(p))
    (tmp_path / "ix").mkdir()
    seen = {}

    def fake_search(index_dir, imgs, **kw):
        seen.update(kw)
        hits = tasks.SearchHits([[_Hit(j) for j in range(3)] for _ in imgs])
        hits.rechecked, hits.margin, hits.recheck_note = list(range(rechecked)), margin, note
        return hits

    monkeypatch.setattr(tasks, "search_images", fake_search)
    with pytest.raises(SystemExit) as e:
        main(["search", "--index", str(tmp_path / "ix"), *images, "--precision", "bf16", "--no-recheck"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and seen["recheck"] is False and seen["precision"] == "bf16"
    if expect is None:
        assert "recheck" not in out
    else:
        assert expect in out
        assert ("most of them" in out) == (rechecked > n / 2)
