"""The derm_gated bundle (gated-attention FineGrainedMIL layered on isic_dsl) on the embedded sample: train with the
λ schedule, ONNX export parity (outputs and the instance boxes behind them), the Table 2 variants, the histology
variant on a folder of TIFFs, metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "derm_gated"
TINY = {"max_epochs": 2, "image_size": 64, "global_size": 32, "local_size": 32, "backbone": "resnet10",
        "widen_factor": 0.25, "embedding_dim": 16, "batch_size": 16, "eval_batch_size": 32,
        "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}  # no TensorBoard, no progress bar
VARIANTS = {"plain": "none", "se": "se", "spatial": "spatial", "channel": "channel", "dual": "dual", "gc": "gc"}


def _train(dataset: Path, out: Path, variant: str | None = None, **extra) -> dict:
    from medsim.engines.workflow import train_bundle

    return train_bundle(BUNDLE, variant=variant, dataset_dir=str(dataset), output_dir=str(out),
                        overrides={**TINY, **extra})


@pytest.fixture(scope="module")
def gated_run(sample_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gated") / "run"
    return out, _train(sample_root / "derm", out)


def test_trains_with_the_lambda_schedule(gated_run):
    out, res = gated_run
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    test = json.loads((out / "eval_test.json").read_text())
    assert 0 <= test["R@1"] <= 1 and res["nmi"] == test["nmi"]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    from medsim.export.run import load_run

    d = load_run(out).network.embedding_dim  # the fused feature size: global + pooled instance channels
    assert [r["epoch"] for r in recs] == [1, 2] and all("K" not in r and r["improved"] in (True, False) for r in recs)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["network_def"]["_target_"] == "medsim.nn.gated_attention.FineGrainedMIL" and cfg["attention"] == "gated"
    assert cfg["split_by"] == "lesion_id" and cfg["method"]["handlers"] == []  # the rest comes from isic_dsl
    from medsim.export.run import load_run

    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files

    load_run(out)  # the run reopens from run.json
    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(BUNDLE, None)))  # the loss: from the bundle
    loss = parser.get_parsed_content("loss")
    assert loss.takes_outputs
    loss.set_epoch(1, 2)
    assert loss.lam == pytest.approx(0.5)  # compressed schedule: epoch 2 of 2 trained the fusion with λ = 0.5
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert {"fusion_classifier.weight", "local_trunk.0.weight",
            "attention.blocks.0.conv.weight"} <= set(ckpt["network"])


def test_onnx_export_parity_and_instance_boxes(gated_run, tmp_path):
    from medsim.export import export_onnx
    from medsim.export.onnx_export import ExportWrapper, ort_session
    from medsim.export.run import load_run, split_images

    run = load_run(gated_run[0])
    res = export_onnx(run, tmp_path / "onnx", opset=17, batch=2)
    m = res["manifest"]
    assert m["output_names"] == ["embedding", "attention", "logits"] and m["network"]["class"] == "FineGrainedMIL"
    d = run.network.embedding_dim
    assert [o["shape"] for o in m["outputs"]] == [["batch", d], ["batch", 1, 2, 2], ["batch", 4]]
    assert max(m["parity"]["max_abs_diff"].values()) <= 1e-4
    # the boxes that feed the embedding: the same in the exported graph as in PyTorch
    images, _, _ = split_images(run, "validation")
    x = torch.from_numpy(images)
    with torch.no_grad():
        ref = run.network.eval()(x)
    with warnings.catch_warnings(), torch.no_grad():  # (an exporter restores the wrapper's train mode: eval it)
        warnings.simplefilter("ignore")
        torch.onnx.export(ExportWrapper(run.network, ["instance_boxes", "instance_valid"]).eval(), (x[:2],),
                          str(tmp_path / "boxes.onnx"), opset_version=17, dynamo=False, input_names=["image"],
                          output_names=["instance_boxes", "instance_valid"],
                          dynamic_axes={"image": {0: "batch"}, "instance_boxes": {0: "batch"},
                                        "instance_valid": {0: "batch"}})
    boxes, valid = ort_session(tmp_path / "boxes.onnx").run(None, {"image": images})
    np.testing.assert_array_equal(boxes, ref["instance_boxes"].numpy())
    np.testing.assert_array_equal(valid, ref["instance_valid"].numpy())
    assert boxes.shape == (len(images), 2, 4) and (boxes[..., 2] <= 64).all()


def test_variants_wire_the_table2_modules():
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files
    from medsim.nn.gated_attention import FINE_GRAINED_ATTENTIONS

    for variant, name in VARIANTS.items():
        parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(BUNDLE, variant)))
        parser["network_def"]["n_classes"] = 7
        parser.update({k: v for k, v in TINY.items() if "#" not in k})
        net = parser.get_parsed_content("network_def").eval()
        assert isinstance(net.attention, FINE_GRAINED_ATTENTIONS[name]), variant
        assert parser["output_dir"] == f"runs/derm_gated_{variant}"
        assert (net.local_trunk is None) == (variant == "plain")
        with torch.no_grad():
            out = net(torch.randn(2, 3, 64, 64))
        assert out["embedding"].shape == (2, net.embedding_dim) and out["attention"].shape == (2, 1, 2, 2)
        assert net.embedding_dim == net.global_classifier.in_features + (0 if variant == "plain" else
                                                                         net.global_classifier.in_features)


def test_plain_variant_trains(sample_root, tmp_path):
    out = tmp_path / "plain"
    _train(sample_root / "derm", out, "plain", max_epochs=1)
    from medsim.export.run import load_run

    net = load_run(out).network
    assert net.local_trunk is None and net.fusion_classifier is None
    assert (out / "eval_test.json").is_file()


def test_histology_variant_on_a_class_folder_source(tmp_path):
    """Folder-per-class microscopy: TIFF images under one folder per class, split by image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, cls in enumerate(("benign", "invasive")):
        (tmp_path / "bach" / cls).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 120, (48, 64, 3), dtype=np.uint8)
            img[8:24, 8 + 24 * c:24 + 24 * c] = 230  # a class-specific bright patch
            Image.fromarray(img).save(tmp_path / "bach" / cls / f"img{i}.tif")
    out = tmp_path / "run"
    res = _train(tmp_path / "bach", out, "histology", max_epochs=1, n_instances=2, batch_size=8)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["split_by"] == "id" and cfg["image_size"] == 64 and cfg["output_dir"] == str(out)
    split = json.loads((out / "split.json").read_text())
    assert split["meta"]["layout"] == "folder" and split["meta"]["classes"] == ["benign", "invasive"]
    assert 0 <= res["R@1"] <= 1


def test_metadata_matches_the_network():
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files

    fmt = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]
    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(BUNDLE, None)))
    parser["network_def"]["n_classes"] = len(fmt["outputs"]["logits"]["channel_def"])  # HAM10000's 7 classes
    net = parser.get_parsed_content("network_def").eval()
    assert parser["image_size"] == fmt["inputs"]["image"]["spatial_shape"][0]
    with torch.no_grad():
        out = net(torch.zeros(1, 3, *fmt["inputs"]["image"]["spatial_shape"]))
    for name, spec in fmt["outputs"].items():
        assert list(out[name].shape[1:]) == ([spec["num_channels"], *spec["spatial_shape"]] if spec["spatial_shape"]
                                             else [spec["num_channels"]]), name


def test_gated_run_deploys(gated_run, deploy_check):
    got = deploy_check(gated_run[0])
    assert {"embedding", "attention", "logits"} <= set(got)


def test_best_checkpoint_is_selected_on_validation_balanced_accuracy(gated_run):
    import torch

    out = gated_run[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bacc = [r["val_balanced_accuracy"] for r in rows]
    best_epoch = max(range(len(bacc)), key=lambda i: (bacc[i], i)) + 1  # ties: the later epoch, as ">=" keeps
    assert torch.load(out / "best.pt", weights_only=True)["engine"]["epoch"] == best_epoch
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(json.loads((out / "eval_test.json").read_text()))
