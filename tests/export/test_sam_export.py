"""Exporting a SAM run (bundles/ct_sam): the dense global / local maps are graph outputs with their geometry in the
manifest, and onnxruntime reproduces PyTorch on a tiny volume to 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch



@pytest.fixture(scope="module")
def sam_export(tiny_sam_run, tmp_path_factory):
    from medsim.export.onnx_export import export_onnx

    out = tiny_sam_run.parent
    return out, export_onnx(tiny_sam_run, tmp_path_factory.mktemp("sam_export") / "export")  # parity: atol 1e-4


def test_dense_outputs_and_their_geometry_are_in_the_graph_and_manifest(sam_export):
    from medsim.export.onnx_export import onnx_output_shapes

    _, res = sam_export
    m = json.loads(Path(res["manifest_path"]).read_text())
    assert m["output_names"] == ["embedding", "attention", "global", "local"]
    shapes = onnx_output_shapes(res["onnx_path"])
    assert shapes["global"] == ["batch", 16, 2, 2, 2] and shapes["local"] == ["batch", 8, 8, 8, 8]
    geo = m["dense_geometry"]
    assert geo["global"]["stride"] == [8.0] * 3 and geo["local"]["stride"] == [2.0] * 3  # stride-1 stem
    assert geo["global"]["cells"] == [2, 2, 2] and geo["local"]["centre"] == [0.5] * 3
    assert m["attention_geometry"] == geo["local"]
    assert all(v <= 1e-4 for v in m["parity"]["max_abs_diff"].values())
    assert set(m["parity"]["max_abs_diff"]) == {"embedding", "attention", "global", "local"}


def test_onnxruntime_equals_pytorch_on_a_fresh_volume(sam_export):
    from medsim.export.onnx_export import ort_session, run_onnx
    from medsim.export.run import load_run

    out, res = sam_export
    run = load_run(out / "run")
    x = np.random.default_rng(0).uniform(0, 1, size=(3, 1, 16, 16, 16)).astype(np.float32)
    got = run_onnx(ort_session(res["onnx_path"], threads=1), x, batch=2)
    with torch.no_grad():
        ref = run.network.eval()(torch.from_numpy(x))
    for name in ("embedding", "attention", "global", "local"):
        diff = float(np.abs(got[name] - ref[name].numpy()).max())
        print(f"{name}: max |ONNX - PyTorch| = {diff:.2e}")
        assert diff <= 1e-4, name
