"""An export is data from someone else: the files its manifest names (the model, the INT8 models, the TensorRT
engine) must lie inside the export folder; a name that leaves it is refused with the manifest's path, the field
and the fix, before anything is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medsim.deploy import DeployError
from medsim.deploy.engine import open_engine


@pytest.fixture
def export_dir(exported, tmp_path) -> Path:
    d = tmp_path / "export"
    shutil.copytree(Path(exported["onnx_path"]).parent, d)
    return d


def _edit(d: Path, **fields) -> None:
    m = json.loads((d / "manifest.json").read_text())
    for key, value in fields.items():
        section, _, name = key.rpartition("__")
        target = m
        for part in filter(None, section.split("__")):
            target = target.setdefault(part, {})
        target[name] = value
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("fields, precision, named", [
    ({"model": "../outside.onnx"}, "fp32", "'model'"),
    ({"model": "/etc/hostname"}, "fp32", "'model'"),
    ({"int8__model": "../../x.int8.onnx"}, "int8", "'int8.model'"),
    ({"tensorrt__model": "../model.plan"}, "fp32", "'tensorrt.model'"),
])
def test_a_manifest_naming_a_file_outside_the_export_is_refused(export_dir, fields, precision, named):
    shutil.copy(export_dir / "model.onnx", export_dir.parent / "outside.onnx")  # a real model, just outside
    _edit(export_dir, **fields)
    with pytest.raises(DeployError, match="outside the export folder") as err:
        open_engine(export_dir, backend="ort-cpu", precision=precision)
    assert named in str(err.value) and "manifest.json" in str(err.value) and "re-export" in str(err.value)


def test_a_symlink_out_of_the_export_is_refused_and_the_plain_export_opens(export_dir, tmp_path):
    engine = open_engine(export_dir, backend="ort-cpu")  # the untouched export opens
    assert engine.onnx_path == export_dir / "model.onnx"
    shutil.copy(export_dir / "model.onnx", tmp_path / "elsewhere.onnx")
    (export_dir / "link.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    _edit(export_dir, model="link.onnx")
    with pytest.raises(DeployError, match="outside the export folder"):
        open_engine(export_dir, backend="ort-cpu")
