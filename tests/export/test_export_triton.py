"""Triton model repository: every config.pbtxt parsed into Triton's own ModelConfig message (tritonclient's
protos) and checked against the ONNX graph / manifest, for every kind of model medsim exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medsim.errors import MedsimError
from medsim.export import write_triton_repository

pytest.importorskip("tritonclient.grpc.model_config_pb2",
                    reason="tritonclient is not installed (bash scripts/install.sh --dev, or pip install "
                           "'medsim[triton]'): Triton configs are checked with its model_config protos")

from medsim.export.triton import (TritonRepositoryError, graph_io, parse_config, triton_config_text,  # noqa: E402
                                  validate_config, validate_repository)


def tensors(ts) -> list[tuple[str, str, list[int]]]:
    from tritonclient.grpc import model_config_pb2 as pb2

    return [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in ts]


def test_onnx_repository_matches_manifest(exported, tmp_path):
    model_dir = Path(exported["onnx_path"]).parent
    folder = write_triton_repository(model_dir, tmp_path / "repo", name="derm_dsl", max_batch_size=16,
                                     preferred_batch_sizes=[8, 4], max_queue_delay_us=250, instance_count=2,
                                     kind="KIND_CPU")
    assert folder == tmp_path / "repo" / "derm_dsl"
    assert (folder / "1" / "model.onnx").read_bytes() == Path(exported["onnx_path"]).read_bytes()
    cfg = parse_config(folder / "config.pbtxt")
    m = json.loads((folder / "manifest.json").read_text())
    assert cfg.name == "derm_dsl" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert tensors(cfg.input) == [("image", "TYPE_FP32", [3, 32, 32])]
    assert tensors(cfg.output) == [(o["name"], "TYPE_FP32", o["shape"][1:]) for o in m["outputs"]]
    assert [t.name for t in cfg.output] == m["output_names"] == ["embedding", "attention"]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, 2)]  # KIND_CPU
    report = validate_repository(tmp_path / "repo")
    assert [(c.name, c.reference, c.versions) for c in report.models] == [("derm_dsl", "1/model.onnx graph", [1])]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["derm_dsl"]  # no staging folder left


def test_onnx_file_without_manifest_reads_the_graph(exported, tmp_path):
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported["onnx_path"], lone)
    folder = write_triton_repository(lone, tmp_path / "repo", name="m")
    cfg = parse_config(folder / "config.pbtxt")
    assert {t.name: list(t.dims) for t in cfg.output} == {"embedding": [32], "attention": [1, 2, 2]}
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, 1)]  # KIND_GPU
    assert not (folder / "manifest.json").exists() and validate_repository(folder).models[0].name == "m"


def test_tensorrt_plan_repository(exported, tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    m = dict(exported["manifest"], tensorrt={"max_batch": 16})
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "model.plan").write_bytes(b"ENGINE")
    folder = write_triton_repository(d, tmp_path / "repo", name="p", platform="tensorrt_plan", max_batch_size=16,
                                     preferred_batch_sizes=[8])
    cfg = parse_config(folder / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and (folder / "1" / "model.plan").read_bytes() == b"ENGINE"
    assert not (folder / "1" / "model.onnx").exists()
    check = validate_repository(tmp_path / "repo").models[0]  # the plan is opaque here: checked against the manifest
    assert check.reference == "manifest.json" and "not inspected" in check.notes[0]
    with pytest.raises(MedsimError, match="profile ends at batch 16"):
        write_triton_repository(d, tmp_path / "repo", name="p", platform="tensorrt_plan", max_batch_size=64,
                                preferred_batch_sizes=[8])
    with pytest.raises(MedsimError, match="GPU only"):
        write_triton_repository(d, tmp_path / "repo", name="p", platform="tensorrt_plan", kind="KIND_CPU")


@pytest.mark.parametrize("kw, match", [
    ({"platform": "onnxruntime"}, "did you mean 'onnxruntime_onnx'"),
    ({"kind": "KIND_GPUS"}, "did you mean 'KIND_GPU'"),
    ({"name": "a/b"}, "model name 'a/b'"),
    ({"max_batch_size": 4, "preferred_batch_sizes": [8]}, r"\[8\] are outside 1..max_batch_size \(4\)"),
    ({"platform": "tensorrt_plan"}, "model.plan: not found"),
])
def test_bad_options(exported, tmp_path, kw, match):
    with pytest.raises(MedsimError, match=match):
        write_triton_repository(Path(exported["onnx_path"]).parent, tmp_path / "repo", **kw)


# ------------------------------------------------------------------------------ every kind of exported model
def _check_against_graph(folder: Path, onnx_path: Path) -> list[tuple[str, str, list[int]]]:
    """The config's tensors equal the graph's, batch axis left out and -1 for every other dynamic axis."""
    cfg = parse_config(folder / "config.pbtxt")
    ins, outs = graph_io(onnx_path)
    want = [(t["name"], t["data_type"], [-1 if isinstance(d, str) else d for d in t["shape"][1:]])
            for t in [*ins, *outs]]
    assert tensors(cfg.input) + tensors(cfg.output) == want
    return want


def test_classifier_logits_are_declared(loaded, tmp_path):
    from dataclasses import replace

    import torch

    from medsim.export import export_onnx
    from medsim.nn import Embedder

    torch.manual_seed(0)
    net = Embedder("resnet10", widen_factor=0.25, embedding_dim=32, n_classes=4).eval()
    res = export_onnx(replace(loaded, network=net), tmp_path / "export", batch=2)
    folder = write_triton_repository(tmp_path / "export", tmp_path / "repo", name="clf", kind="KIND_CPU")
    got = _check_against_graph(folder, Path(res["onnx_path"]))
    assert got[-1] == ("logits", "TYPE_FP32", [4])
    assert validate_repository(tmp_path / "repo").models[0].outputs[-1]["dims"] == [4]


def test_dense_sam_export_declares_dynamic_spatial_axes(tiny_sam_run, tmp_path):
    from medsim.export.pipeline import export_run

    out = tmp_path / "export"
    res = export_run(tiny_sam_run, out, opt_batch=1, max_batch=2, triton=True, triton_kind="cpu",
                     triton_name="sam")
    m = res["manifest"]
    assert m["dynamic_spatial"] and m["triton"]["model"] == "model.onnx"
    folder = out / "triton" / "sam"
    got = dict((n, (t, d)) for n, t, d in _check_against_graph(folder, out / "model.onnx"))
    assert got["image"] == ("TYPE_FP32", [1, -1, -1, -1])
    assert got["global"] == ("TYPE_FP32", [16, -1, -1, -1]) and got["local"] == ("TYPE_FP32", [8, -1, -1, -1])
    assert got["embedding"] == ("TYPE_FP32", [16])
    report = validate_repository(out)  # the export folder works too: its triton/ is checked
    assert [c.name for c in report.models] == ["sam"] and "dynamic axes in" in report.lines()[0]
    # a config that pins the spatial axes (the manifest's checked size) no longer matches the graph
    cfg = folder / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("dims: [ 1, -1, -1, -1 ]", "dims: [ 1, 16, 16, 16 ]"))
    with pytest.raises(TritonRepositoryError, match=r"input 'image': dims \[1, 16, 16, 16\], the model's are "
                                                    r"\[1, -1, -1, -1\]"):
        validate_repository(out)


def test_int8_model_is_served_and_checked_against_its_own_graph(tiny_run, tmp_path):
    from medsim.export.pipeline import export_run

    out = tmp_path / "export"
    res = export_run(tiny_run, out, opt_batch=2, max_batch=4, quantize="dynamic", triton=True, triton_kind="cpu",
                     triton_name="q")
    assert res["manifest"]["triton"]["model"] == "model.int8.onnx"
    folder = out / "triton" / "q"
    assert (folder / "1" / "model.onnx").read_bytes() == (out / "model.int8.onnx").read_bytes()
    _check_against_graph(folder, out / "model.int8.onnx")
    cfg = parse_config(folder / "config.pbtxt")
    assert cfg.max_batch_size == 4 and list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert validate_repository(out / "triton").models[0].reference == "1/model.onnx graph"


def test_tensorrt_config_alone_against_the_manifest(exported):
    """No TensorRT here: the plan flavour's config is checked on its own and against the manifest it was built
    from (the same dims as the ONNX model at the manifest's fixed input size)."""
    m = exported["manifest"]
    io = [{"name": t["name"], "dims": t["shape"][1:]} for t in [m["input"], *m["outputs"]]]
    text = triton_config_text("p", "tensorrt_plan", io[:1], io[1:], max_batch_size=8, preferred_batch_sizes=[4, 8],
                              max_queue_delay_us=100, instance_count=1, kind="KIND_GPU")
    cfg = validate_config(text, manifest=m, name="p")
    assert cfg.platform == "tensorrt_plan" and tensors(cfg.input) == [("image", "TYPE_FP32", [3, 32, 32])]
    with pytest.raises(TritonRepositoryError, match="a TensorRT plan runs on GPU only"):
        validate_config(text.replace("KIND_GPU", "KIND_CPU"), manifest=m)
    with pytest.raises(TritonRepositoryError, match=r"output 'embedding': dims \[33\], the model's are \[32\]"):
        validate_config(text.replace("dims: [ 32 ]", "dims: [ 33 ]"), manifest=m)


# ------------------------------------------------------------------------------------ what Triton refuses
@pytest.mark.parametrize("old, new, match", [
    ('max_batch_size: 32', 'max_batch_size: 32\nmax_batch: 2', 'has no field named "max_batch"'),
    ("kind: KIND_GPU", "kind: KIND_TPU", "KIND_TPU"),
    ('name: "m"', 'name: "other"', "name 'other' differs from the folder's name 'm'"),
    ('platform: "onnxruntime_onnx"', 'platform: "onnxruntime_onnx"\nbackend: "tensorrt"',
     "runs on backend 'onnxruntime', not 'tensorrt'"),
    ('platform: "onnxruntime_onnx"', 'platform: "pytorch_libtorch"', "platform 'pytorch_libtorch' is not one"),
    ("data_type: TYPE_FP32\n    dims: [ 32 ]", "data_type: TYPE_FP16\n    dims: [ 32 ]",
     "output 'embedding': data_type TYPE_FP16, the model's is TYPE_FP32"),
    ("dims: [ 3, 32, 32 ]", "dims: [ 2, 3, 32, 32 ]", r"dims leave out the batch axis"),
    ('name: "attention"', 'name: "attn"', r"outputs \['attn', 'embedding'\] but the model has"),
    ("preferred_batch_size: [ 8, 16 ]", "preferred_batch_size: [ 8, 64 ]", r"\[64\] outside 1..max_batch_size"),
    ("count: 1", "count: 0", "count must be >= 1"),
    ("max_batch_size: 32", "max_batch_size: 0", "dynamic_batching needs max_batch_size > 0"),
])
def test_validation_names_what_triton_would_refuse(exported, tmp_path, old, new, match):
    folder = write_triton_repository(Path(exported["onnx_path"]).parent, tmp_path / "repo", name="m",
                                     preferred_batch_sizes=[8, 16])
    cfg = folder / "config.pbtxt"
    assert old in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(old, new, 1))
    with pytest.raises(TritonRepositoryError, match=match):
        validate_repository(tmp_path / "repo")


def test_version_layout_is_checked(exported, tmp_path):
    folder = write_triton_repository(Path(exported["onnx_path"]).parent, tmp_path / "repo", name="m")
    (folder / "1" / "model.onnx").rename(folder / "1" / "other.onnx")
    with pytest.raises(TritonRepositoryError, match=r"1/model.onnx: not found"):
        validate_repository(tmp_path / "repo")
    shutil.rmtree(folder / "1")
    (folder / "latest").mkdir()
    with pytest.raises(TritonRepositoryError, match=r"no version folder.*\n.*\['latest'\] are not versions|"
                                                    r"\['latest'\] are not versions"):
        validate_repository(tmp_path / "repo")


def test_a_repository_that_fails_validation_is_never_written(exported, tmp_path, monkeypatch):
    import medsim.export.triton as mod

    model_dir = Path(exported["onnx_path"]).parent
    folder = write_triton_repository(model_dir, tmp_path / "repo", name="m", max_batch_size=8,
                                     preferred_batch_sizes=[4])
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    good = mod.triton_config_text
    monkeypatch.setattr(mod, "triton_config_text", lambda *a, **k: good(*a, **k).replace("dims: [ 32 ]",
                                                                                       "dims: [ 31 ]"))
    with pytest.raises(TritonRepositoryError, match=r"output 'embedding': dims \[31\], the model's are \[32\]"):
        write_triton_repository(model_dir, tmp_path / "repo", name="m", max_batch_size=16, preferred_batch_sizes=[4])
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m"]
    with pytest.raises(TritonRepositoryError, match=r"\[31\]"):  # a first export is not written either
        write_triton_repository(model_dir, tmp_path / "repo2", name="m")
    assert list((tmp_path / "repo2").iterdir()) == []
