"""derm_lossattn (loss-based attention layered on isic_dsl): a 1-epoch tiny run of the default and the capsule
variant on the embedded sample, the MIL variants build, and ONNX export parity of a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "derm_lossattn"
# 32 px images, stem stride 2: 16×16 trunk features -> 2×2 patches
TINY = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "patch_channels": 16,
        "batch_size": 16, "eval_batch_size": 32, "train#output_handlers#0#_disabled_": True,
        "train#output_handlers#1#_disabled_": True}
TINY_CAPSULE = {"network_def#primary_channels": 4, "network_def#primary_dim": 4, "network_def#capsule_channels": 4,
                "network_def#capsule_dim": 8}


def _train(sample_root: Path, out: Path, variant: str | None = None, **extra) -> dict:
    from medsim.engines.workflow import train_bundle

    return train_bundle(BUNDLE, variant=variant, dataset_dir=str(sample_root / "derm"), output_dir=str(out),
                        overrides={**TINY, **extra})


@pytest.fixture(scope="module")
def lossattn_run(sample_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lossattn") / "run"
    _train(sample_root, out)
    return out


def test_default_run_trains_loss_attention(lossattn_run):
    out = lossattn_run
    res = json.loads((out / "eval_test.json").read_text())
    assert 0 <= res["nmi"] <= 1 and 0 <= res["R@1"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"]["name"] == "loss_attention" and cfg["method"]["handlers"] == []  # no DSL machinery
    assert cfg["network_def"]["_target_"] == "medsim.nn.loss_attention.LossAttentionNet"
    assert cfg["loss"]["_target_"] == "medsim.losses.loss_attention.LossAttentionLoss"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert tuple(ckpt["network"]["classifier.weight"].shape) == (4, 16)  # 4 sample classes, 16 patch channels
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "K" not in rec and rec["loss"] > 0


def test_capsule_variant_trains_and_exports(sample_root, tmp_path):
    from medsim.export import export_onnx

    res = _train(sample_root, tmp_path / "caps", "capsule", **TINY_CAPSULE)
    assert 0 <= res["R@1"] <= 1
    state = torch.load(tmp_path / "caps" / "last.pt", weights_only=True)["network"]
    assert "primary_threshold" in state and tuple(state["classifier.weight"].shape) == (4, 8)
    par = export_onnx(tmp_path / "caps", tmp_path / "onnx", opset=17, batch=2)["manifest"]["parity"]
    assert max(par["max_abs_diff"].values()) < 1e-4


@pytest.mark.parametrize("variant,pooling,gamma", [("mean", "mean", 0.0), ("attention_mil", "attention", 0.0),
                                                   ("gated_mil", "gated", 0.0), ("sigmoid", "loss", 0.1)])
def test_variants_configure_pooling_and_loss(variant, pooling, gamma, tmp_path):
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files

    parser = ConfigParser()
    parser.read_config(_bundle_files(BUNDLE, variant))
    parser.update({**TINY, "classes": ["a", "b", "c"]})
    net, loss = parser.get_parsed_content("network_def"), parser.get_parsed_content("loss")
    assert net.pooling_name == pooling and loss.gamma_max == gamma
    assert loss.mode == ("sigmoid" if variant == "sigmoid" else "softmax")
    assert net(torch.randn(2, 3, 32, 32))["patch_weights"].shape == (2, 4)


def test_onnx_export_parity_of_a_trained_run(lossattn_run, tmp_path):
    from medsim.export import export_onnx
    from medsim.export.run import load_run

    res = export_onnx(load_run(lossattn_run), tmp_path / "onnx", opset=17, batch=2)
    m = res["manifest"]
    assert m["output_names"] == ["embedding", "attention", "logits"] and m["opset"] == 17
    assert [o["shape"] for o in m["outputs"]] == [["batch", 16], ["batch", 1, 2, 2], ["batch", 4]]
    for name, diff in m["parity"]["max_abs_diff"].items():
        assert 0.0 <= diff < 1e-4, (name, diff)


def test_lossattn_run_deploys(lossattn_run, deploy_check):
    got = deploy_check(lossattn_run)
    assert {"embedding", "attention", "logits"} <= set(got)


def test_classifier_runs_report_classification_metrics(lossattn_run):
    import json

    res = json.loads((lossattn_run / "eval_test.json").read_text())
    assert {"accuracy", "balanced_accuracy", "macro_f1", "nmi", "R@1"} <= set(res)
    assert all(0.0 <= res[k] <= 1.0 for k in ("accuracy", "balanced_accuracy", "macro_f1"))
