"""The export manifest records where the attention cells sit; localize reads it back (older exports: stretch)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def lossattn_export(loaded, tmp_path_factory):
    """The tiny run's data and preprocessing (32×32) with a loss-attention network: a 2×2 patch grid centred at
    8.5 and 16.5 px (trunk 16×16, 9×9 stride-4 patches), not at the stretched 8 and 24."""
    from medsim.export import export_onnx
    from medsim.nn import LossAttentionNet

    torch.manual_seed(0)
    net = LossAttentionNet("resnet10", n_classes=4, widen_factor=0.125, patch_channels=8).eval()
    out = tmp_path_factory.mktemp("lossattn_export")
    return export_onnx(replace(loaded, network=net), out, batch=2), net


def test_manifest_records_the_geometry(lossattn_export):
    from medsim.deploy.geometry import AttentionGeometry, geometry_from_manifest
    from medsim.deploy.preprocess import load_manifest

    res, net = lossattn_export
    m = json.loads(Path(res["manifest_path"]).read_text())
    g = m["attention_geometry"]
    assert g["input_size"] == [32, 32] and g["cells"] == [2, 2] == m["attention_resolution"]
    assert g["centre"] == [8.5, 8.5] and g["stride"] == [8.0, 8.0] and g["receptive_field"] == [49.0, 49.0]
    loaded_back = geometry_from_manifest(load_manifest(Path(res["manifest_path"]).parent))
    assert loaded_back == net.attention_geometry((32, 32)) == AttentionGeometry.from_dict(g)


def test_localize_places_cells_from_the_manifest_and_old_manifests_stretch(lossattn_export, loaded, tmp_path,
                                                                           caplog):
    from PIL import Image

    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.geometry import geometry_from_manifest
    from medsim.deploy.localizer import Localizer
    from medsim.deploy.preprocess import load_manifest
    from medsim.deploy.tasks import localize_images

    res, _ = lossattn_export
    model_dir = Path(res["manifest_path"]).parent
    image = Path(loaded.datalists["test"][0]["image"])
    got = localize_images(model_dir, [image], tmp_path / "new", progress=False)
    assert got["images"] == 1
    with EmbeddingEngine(model_dir, backend="ort-cpu") as engine:
        out = engine.embed([str(image)], return_sizes=True)
    size = tuple(int(v) for v in out["image_size"][0])
    geometry = geometry_from_manifest(load_manifest(model_dir))
    expect = Localizer().localize(out["attention"][0], size, geometry)
    from medsim.deploy.tasks import case_names  # outputs are named by case token

    mask = np.asarray(Image.open(tmp_path / "new" / f"{case_names([image])[0]}_mask.png")) > 0
    np.testing.assert_array_equal(mask, expect.mask)

    # an export made before the geometry existed: still localizes, stretched, with a warning
    m = load_manifest(model_dir)
    del m["attention_geometry"]
    (model_dir / "manifest.json").write_text(json.dumps(m))
    try:
        with caplog.at_level(logging.WARNING, logger="medsim.deploy.geometry"):
            localize_images(model_dir, [image], tmp_path / "old", progress=False)
        assert "no attention_geometry" in caplog.text
        old = np.asarray(Image.open(tmp_path / "old" / f"{case_names([image])[0]}_mask.png")) > 0
        np.testing.assert_array_equal(old, Localizer().localize(out["attention"][0], size).mask)
        assert (old != mask).any()  # the stretched 2×2 grid lands elsewhere
    finally:
        (model_dir / "manifest.json").write_text(json.dumps({**m, "attention_geometry": geometry.to_dict()}))


def test_a_network_without_geometry_exports_with_a_warning(caplog):
    from medsim.export.onnx_export import _attention_geometry

    with caplog.at_level(logging.WARNING, logger="medsim.export.onnx_export"):
        assert _attention_geometry(torch.nn.Identity(), (32, 32)) is None
    assert "no attention_geometry" in caplog.text
