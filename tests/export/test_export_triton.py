"""Triton model repository: config.pbtxt parsed back structurally and matched against the manifest."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from medsim.errors import MedsimError
from medsim.export import write_triton_repository


def parse_pbtxt(text: str) -> dict:
    """A small protobuf text-format reader (enough for Triton configs): ``key: value``, ``key { ... }``,
    ``key [ {...}, ... ]`` / ``key: [ 1, 2 ]``. Repeated keys become lists."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)
    pos = 0

    def value(tok: str):
        if tok.startswith('"'):
            return tok[1:-1]
        try:
            return int(tok)
        except ValueError:
            return tok  # enum

    def parse_list() -> list:
        nonlocal pos
        items = []
        while tokens[pos] != "]":
            if tokens[pos] == ",":
                pos += 1
                continue
            if tokens[pos] == "{":
                pos += 1
                items.append(parse_msg("}"))
            else:
                items.append(value(tokens[pos]))
                pos += 1
        pos += 1
        return items

    def parse_msg(end: str | None) -> dict:
        nonlocal pos
        msg: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                v = parse_msg("}")
            elif tokens[pos] == "[":
                pos += 1
                v = parse_list()
            else:
                v = value(tokens[pos])
                pos += 1
            assert key not in msg, f"duplicate key {key}"
            msg[key] = v
        pos += 1
        return msg

    return parse_msg(None)


def test_onnx_repository_matches_manifest(exported, tmp_path):
    model_dir = Path(exported["onnx_path"]).parent
    folder = write_triton_repository(model_dir, tmp_path / "repo", name="derm_dsl", max_batch_size=16,
                                     preferred_batch_sizes=[8, 4], max_queue_delay_us=250, instance_count=2,
                                     kind="KIND_CPU")
    assert folder == tmp_path / "repo" / "derm_dsl"
    assert (folder / "1" / "model.onnx").read_bytes() == Path(exported["onnx_path"]).read_bytes()
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    m = json.loads((folder / "manifest.json").read_text())
    assert cfg["name"] == "derm_dsl" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 16
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["input"]] == [("image", "TYPE_FP32", [3, 32, 32])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["output"]] == [
        (o["name"], "TYPE_FP32", o["shape"][1:]) for o in m["outputs"]]
    assert [t["name"] for t in cfg["output"]] == m["output_names"] == ["embedding", "attention"]
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 250}
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]


def test_onnx_file_without_manifest_reads_the_graph(exported, tmp_path):
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported["onnx_path"], lone)
    folder = write_triton_repository(lone, tmp_path / "repo", name="m")
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert {t["name"]: t["dims"] for t in cfg["output"]} == {"embedding": [32], "attention": [1, 2, 2]}
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]


def test_tensorrt_plan_repository(exported, tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    m = dict(exported["manifest"], tensorrt={"max_batch": 16})
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "model.plan").write_bytes(b"ENGINE")
    folder = write_triton_repository(d, tmp_path / "repo", name="p", platform="tensorrt_plan", max_batch_size=16,
                                     preferred_batch_sizes=[8])
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert cfg["platform"] == "tensorrt_plan" and (folder / "1" / "model.plan").read_bytes() == b"ENGINE"
    assert not (folder / "1" / "model.onnx").exists()
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
