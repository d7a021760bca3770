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
    assert shapes["global"] == ["batch", 16, "global_x", "global_y", "global_z"]  # dynamic spatial axes
    assert shapes["local"] == ["batch", 8, "local_x", "local_y", "local_z"]
    assert shapes["image"] == ["batch", 1, "x", "y", "z"] and m["input"]["shape"] == ["batch", 1, 16, 16, 16]
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


def test_other_spatial_sizes_are_checked_and_recorded(sam_export):
    """The dense export serves any size that is a multiple of the coarsest stride: the export proved it at a grown
    size (onnxruntime = PyTorch, the cells' centres and strides unchanged) and onnxruntime equals PyTorch on a
    fresh, differently sized volume, with the cell counts the geometry predicts."""
    from medsim.export.onnx_export import ort_session, run_onnx
    from medsim.export.run import load_run

    out, res = sam_export
    m = json.loads(Path(res["manifest_path"]).read_text())
    dyn = m["dynamic_spatial"]
    assert dyn["multiple"] == 8 and dyn["min_size"] == [16, 16, 16] and dyn["checked_size"] == [24, 32, 40]
    assert set(dyn["max_abs_diff"]) == {"embedding", "attention", "global", "local"}
    assert all(v <= 1e-4 for v in dyn["max_abs_diff"].values())
    run = load_run(out / "run")
    x = np.random.default_rng(1).uniform(0, 1, size=(1, 1, 32, 24, 16)).astype(np.float32)
    got = run_onnx(ort_session(res["onnx_path"], threads=1), x, batch=1)
    with torch.no_grad():
        ref = run.network.eval()(torch.from_numpy(x))
    for name, cells in (("global", (4, 3, 2)), ("local", (16, 12, 8))):
        assert got[name].shape[2:] == cells
        g = run.network.map_geometry(name, (32, 24, 16))
        assert g.grid == cells and [a.centre for a in g.axes] == m["dense_geometry"][name]["centre"]
    for name in ("embedding", "attention", "global", "local"):
        assert float(np.abs(got[name] - ref[name].numpy()).max()) <= 1e-4, name


def test_a_geometry_that_moves_with_the_size_is_refused(sam_export):
    """check_dynamic_spatial refuses a network whose cell centres depend on the input size."""
    from medsim.export.errors import ExportError
    from medsim.export.onnx_export import check_dynamic_spatial
    from medsim.export.run import load_run
    from medsim.runtime.geometry import AttentionGeometry, AxisGeometry

    out, res = sam_export
    net = load_run(out / "run").network.eval()
    honest = net.map_geometry

    def moving(name, size):
        g = honest(name, size)
        return AttentionGeometry(g.input_size, tuple(AxisGeometry(a.cells, a.centre + (n > 16), a.stride,
                                                                  a.receptive_field) for a, n in zip(g.axes, size)))

    net.map_geometry = moving
    x = np.random.default_rng(2).uniform(0, 1, size=(1, 1, 16, 16, 16)).astype(np.float32)
    with pytest.raises(ExportError, match="move with the input size"):
        check_dynamic_spatial(res["onnx_path"], net, x, ["embedding", "attention", "global", "local"])


def test_openvino_reads_every_dense_output_by_its_name(sam_export):
    """OpenVINO gives an output tensor every name it had in the graph (here `attention` also carries the internal
    "/network/…" names of the node that made it); the runner must list and fetch each output by its graph name, or
    the export's OpenVINO check fails on SAM exports (found on the real-CT run, benchmarks/ct_real.py)."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'medsim[openvino]'")
    from medsim.export.run import load_run
    from medsim.runtime.errors import DeployError
    from medsim.runtime.runners import OvRunner

    out, res = sam_export
    runner = OvRunner(res["onnx_path"], "fp32", threads=1)
    assert runner.output_names == ["embedding", "attention", "global", "local"]
    x = np.random.default_rng(1).uniform(0, 1, size=(2, 1, 16, 16, 16)).astype(np.float32)
    got = runner(x)
    with torch.no_grad():
        ref = load_run(out / "run").network.eval()(torch.from_numpy(x))
    for name in runner.output_names:
        assert float(np.abs(got[name] - ref[name].numpy()).max()) <= 1e-4, name
    with pytest.raises(DeployError, match="no output named nope"):
        OvRunner(res["onnx_path"], "fp32", threads=1, output_names=["nope"])
