"""ONNX export of a trained run: parity with PyTorch (and a perturbed model failing it), dynamic batch, checker,
one self-contained file, the manifest."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch


def test_parity_within_atol_on_validation_images(exported):
    par = exported["manifest"]["parity"]
    assert par["images_from"] == "validation split" and par["images"] == 7
    assert par["batch_sizes"] == [1, 2] and set(par["by_batch"]) == {"1", "2"}
    assert set(par["max_abs_diff"]) == {"embedding", "attention"}
    for name, diff in par["max_abs_diff"].items():
        assert 0.0 <= diff <= 1e-4, (name, diff)


def _perturbed(src: Path, dst: Path, name: str, delta: float) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    init = next(i for i in model.graph.initializer if i.name == name)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += delta  # one weight of one initializer
    init.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(model, str(dst))
    return dst


def test_perturbed_onnx_fails_parity(exported, loaded, tmp_path):
    from medsim.export import ExportParityError, check_parity
    from medsim.export.run import split_images

    images, _, _ = split_images(loaded, "validation")
    bad = _perturbed(Path(exported["onnx_path"]), tmp_path / "bad.onnx", "network.embed.weight", 0.5)
    with pytest.raises(ExportParityError) as e:
        check_parity(bad, loaded.network, images, batch_sizes=(1, 2), atol=1e-4)
    assert e.value.output == "embedding" and e.value.diff > 1e-4 and e.value.batch == 1
    assert "'embedding'" in str(e.value) and "bad.onnx" in str(e.value)

    # a perturbation far below the tolerance passes: the check measures, it does not just fail on any edit
    tiny = _perturbed(Path(exported["onnx_path"]), tmp_path / "tiny.onnx", "network.embed.weight", 1e-7)
    assert check_parity(tiny, loaded.network, images, atol=1e-4)["max_abs_diff"]["embedding"] <= 1e-4


def test_attention_perturbation_is_caught(exported, loaded, tmp_path):
    from medsim.export import ExportParityError, check_parity
    from medsim.export.run import split_images

    images, _, _ = split_images(loaded, "validation")
    bad = _perturbed(Path(exported["onnx_path"]), tmp_path / "att.onnx", "network.attention.net.4.bias", 2.0)
    with pytest.raises(ExportParityError) as e:
        check_parity(bad, loaded.network, images, atol=1e-4)
    assert e.value.output in ("embedding", "attention") and e.value.diff > 1e-3


def test_one_checked_self_contained_file(exported):
    import onnx

    out = Path(exported["onnx_path"]).parent
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]  # no .data, no temp files
    onnx.checker.check_model(exported["onnx_path"], full_check=True)
    model = onnx.load(exported["onnx_path"])
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["embedding", "attention"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims == {"image": ["batch", 3, 32, 32], "embedding": ["batch", 32], "attention": ["batch", 1, 2, 2]}
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_dynamic_batch_in_onnxruntime(exported, loaded, batch):
    from medsim.export.onnx_export import ort_session

    sess = ort_session(exported["onnx_path"])
    x = np.random.default_rng(batch).normal(size=(batch, 3, 32, 32)).astype(np.float32)
    emb, att = sess.run(["embedding", "attention"], {"image": x})
    assert emb.shape == (batch, 32) and att.shape == (batch, 1, 2, 2)
    with torch.no_grad():
        ref = loaded.network(torch.from_numpy(x))
    np.testing.assert_allclose(emb, ref["embedding"].numpy(), atol=1e-4)
    np.testing.assert_allclose(att, ref["attention"].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_manifest_fields(exported, tiny_run, sample_root):
    path = Path(exported["manifest_path"])
    m = json.loads(path.read_text())
    assert m == exported["manifest"]
    assert m["model"] == "model.onnx" and m["opset"] == 17 and m["exporter"] == "legacy"
    assert m["input"]["name"] == "image" and m["input"]["dtype"] == "float32"
    assert m["input"]["shape"] == ["batch", 3, 32, 32]
    assert m["output_names"] == ["embedding", "attention"]
    assert [o["shape"] for o in m["outputs"]] == [["batch", 32], ["batch", 1, 2, 2]]
    assert m["embedding_dim"] == 32 and m["attention_resolution"] == [2, 2]
    assert m["classes"] == ["round", "ring", "lobed", "streaks"] and m["n_classes"] == 4
    pre = m["preprocessing"]
    assert pre["kind"] == "rgb2d" and pre["spatial_size"] == [32, 32] and pre["resize_mode"] == "area"
    assert pre["scale"] == {"from": [0.0, 255.0], "to": [0.0, 1.0], "clip": True}
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["channel_order"] == "RGB" and "(C, x, y)" in pre["axis_order"]
    assert m["source"]["sha256"] == hashlib.sha256((tiny_run / "best.pt").read_bytes()).hexdigest()
    assert m["source"]["checkpoint"] == "best.pt"
    import medsim
    import onnx

    assert m["medsim_version"] == medsim.__version__
    assert m["versions"]["onnx"] == onnx.__version__ and m["versions"]["torch"] == torch.__version__
    created = datetime.fromisoformat(m["created"].replace("Z", "+00:00"))
    assert created.utcoffset().total_seconds() == 0
    text = path.read_text()  # no image ids, file names or local paths (patient identifiers in real data)
    for leak in ("SAMPLE_", ".png", str(sample_root), str(tiny_run), "/tmp"):
        assert leak not in text, leak


def test_manifest_preprocessing_reproduces_monai(exported, loaded):
    """A consumer following only the manifest (PIL + NumPy, no MONAI) feeds the model what training saw."""
    from PIL import Image

    pre = exported["manifest"]["preprocessing"]
    item = loaded.datalists["validation"][0]
    rgb = np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    assert rgb.shape[:2] == (32, 32)  # the sample is already at spatial_size: the resize is the identity
    lo, hi = pre["scale"]["from"]
    b0, b1 = pre["scale"]["to"]
    x = np.clip((rgb - lo) / (hi - lo) * (b1 - b0) + b0, b0, b1)
    x = x.transpose(2, 1, 0)  # the manifest's axis note: (H, W, C) -> (C, x, y)
    x = (x - np.array(pre["mean"])[:, None, None]) / np.array(pre["std"])[:, None, None]
    ref = loaded.transform(dict(item))["image"].numpy()
    np.testing.assert_allclose(x, ref, atol=1e-5)
    assert not np.allclose(x.transpose(0, 2, 1), ref, atol=1e-3)  # the transpose matters


def test_dynamo_exporter_for_opset_18(loaded, tmp_path):
    from medsim.export import export_onnx

    res = export_onnx(loaded, tmp_path, opset=18, batch=3)
    m = res["manifest"]
    assert m["exporter"] == "dynamo" and m["opset"] == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx"]
    assert m["parity"]["batch_sizes"] == [1, 3] and max(m["parity"]["max_abs_diff"].values()) <= 1e-4


def test_classifier_head_adds_logits(loaded, tmp_path):
    from dataclasses import replace

    from medsim.export import export_onnx
    from medsim.nn import Embedder

    torch.manual_seed(0)
    net = Embedder("resnet10", widen_factor=0.25, embedding_dim=32, n_classes=4).eval()
    res = export_onnx(replace(loaded, network=net), tmp_path, batch=2)
    m = res["manifest"]
    assert m["output_names"] == ["embedding", "attention", "logits"]
    assert m["outputs"][2]["shape"] == ["batch", 4] and m["parity"]["max_abs_diff"]["logits"] <= 1e-4


def test_checkpoint_file_and_missing_files(tiny_run, tmp_path):
    import shutil

    from medsim.errors import MedsimError
    from medsim.export.run import load_run

    assert load_run(tiny_run / "last.pt").checkpoint.name == "last.pt"
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(tiny_run / "best.pt", lonely / "best.pt")
    with pytest.raises(MedsimError, match=r"lonely/run.json: not found"):
        load_run(lonely / "best.pt")
    with pytest.raises(MedsimError, match="no best.pt or last.pt"):
        load_run(tmp_path)
