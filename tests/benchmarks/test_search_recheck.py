"""benchmarks/search_recheck.py on the tiny run: the end-to-end search's agreement with fp32 is computed from the
hits themselves. Skipped without OpenVINO or a bf16 CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'medsim[openvino]'")
if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
    pytest.skip("this CPU has no bf16 (OpenVINO lists no BF16 capability)", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import search_recheck as B  # noqa: E402


def test_search_recheck_smoke(tiny_run, tmp_path):
    from medsim.export import export_run

    export_run(tiny_run, tmp_path / "export")
    out = tmp_path / "res"
    assert B.main(["--model", str(tmp_path / "export"), "--data", str(tiny_run / "split.json"), "--split", "test",
                   "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["search"]: r for r in doc["rows"]}
    assert set(rows) == {"fp32", "bf16", "bf16 --no-recheck"} and doc["cases"] == rows["fp32"]["queries"] > 0
    assert rows["fp32"]["same_set"] == rows["fp32"]["same_order"] == 1.0
    # the tiny export's 7 validation images are too few to calibrate: every query is rechecked, so fp32's hits
    assert rows["bf16"]["rechecked"] == doc["cases"] and rows["bf16"]["same_order"] == 1.0
    assert rows["bf16 --no-recheck"]["margin"] is None and rows["bf16 --no-recheck"]["rechecked"] == 0
    assert "Command: `python " in out.with_suffix(".md").read_text()
