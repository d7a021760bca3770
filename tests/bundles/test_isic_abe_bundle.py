"""The isic_abe bundle (ABE-M layered on isic_dsl) on the embedded sample: train, the nodiv ablation, ONNX export,
metadata."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "isic_abe"
TINY = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "embedding_dim": 16,
        "n_learners": 2, "batch_size": 16, "eval_batch_size": 32,
        "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}  # no TensorBoard, no progress bar


def _train(sample_root: Path, out: Path, variant: str | None = None) -> dict:
    from medsim.engines.workflow import train_bundle

    return train_bundle(BUNDLE, variant=variant, dataset_dir=str(sample_root / "derm"), output_dir=str(out),
                        overrides=dict(TINY))


@pytest.fixture(scope="module")
def abe_run(sample_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("abe") / "run"
    return out, _train(sample_root, out)


def test_trains_and_evaluates(abe_run):
    out, res = abe_run
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file() and (out / "split.json").is_file()
    test = json.loads((out / "eval_test.json").read_text())
    assert {"nmi", "ami", "R@1", "R@2", "R@4", "map_at_r"} <= set(test) and 0 <= test["R@1"] <= 1
    assert res["nmi"] == test["nmi"]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "K" not in rec and "learner_neurons" not in rec and "val_nmi" in rec  # not DSL: no subspace record
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["network_def"]["_target_"] == "medsim.nn.abe.ABEEmbedder" and cfg["lambda_div"] == 1.0
    assert cfg["image_size"] == 32 and cfg["split_by"] == "lesion_id"  # the rest comes from isic_dsl
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert {"attention_heads.0.weight", "attention_heads.1.weight", "embed.weight"} <= set(ckpt["network"])
    assert tuple(ckpt["network"]["embed.weight"].shape)[0] == 8  # shared G embeds D/M = 16/2
    assert sorted(k for k in ckpt["loss"] if k.endswith("beta")) == ["metric.0.loss.beta", "metric.1.loss.beta"]


def test_nodiv_variant_disables_the_divergence_loss(sample_root, tmp_path):
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files

    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(BUNDLE, "nodiv")))
    assert parser["lambda_div"] == 0.0 and parser["output_dir"] == "runs/isic_abe_nodiv"
    assert parser["loss"]["_target_"] == "medsim.losses.divergence.ABELoss"
    out = tmp_path / "nodiv"
    _train(sample_root, out, "nodiv")
    from medsim.export.run import load_run

    assert load_run(out).record["variant"] == "nodiv"
    assert json.loads((out / "config.json").read_text())["lambda_div"] == 0.0
    assert (out / "eval_test.json").is_file()


def test_onnx_export_parity(abe_run, tmp_path):
    from medsim.export import export_onnx
    from medsim.export.run import load_run

    res = export_onnx(load_run(abe_run[0]), tmp_path / "onnx", opset=17, batch=2)
    m = res["manifest"]
    assert m["output_names"] == ["embedding", "attention"] and m["network"]["class"] == "ABEEmbedder"
    assert [o["shape"] for o in m["outputs"]] == [["batch", 16], ["batch", 1, 2, 2]]
    assert m["parity"]["batch_sizes"] == [1, 2]
    assert max(m["parity"]["max_abs_diff"].values()) <= 1e-4


def test_metadata_matches_the_network_and_verifies_offline(tmp_path, monkeypatch):
    import monai.apps.utils
    from monai.bundle import ConfigParser, verify_metadata

    from medsim.engines.workflow import _bundle_files

    meta_file = BUNDLE / "configs" / "metadata.json"
    schema = ROOT / "medsim" / "schemas" / "bundle_metadata.json"
    copy = tmp_path / "meta_schema.json"
    shutil.copyfile(schema, copy)  # verify_metadata finds the schema at filepath and skips the download

    def _refuse(url, *args, **kwargs):
        raise AssertionError(f"verify_metadata tried to download {url}")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", _refuse)
    monkeypatch.setattr(monai.apps.utils, "urlopen", _refuse)
    verify_metadata(meta_file=str(meta_file), filepath=str(copy),
                    hash_val=hashlib.sha256(schema.read_bytes()).hexdigest(), hash_type="sha256")

    # network_data_format describes what the default network_def really outputs
    fmt = json.loads(meta_file.read_text())["network_data_format"]
    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(BUNDLE, None)))
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, *fmt["inputs"]["image"]["spatial_shape"]))
    assert out["embedding"].shape[1] == fmt["outputs"]["embedding"]["num_channels"]
    assert list(out["attention"].shape[1:]) == [fmt["outputs"]["attention"]["num_channels"],
                                                 *fmt["outputs"]["attention"]["spatial_shape"]]


def test_abe_run_deploys(abe_run, deploy_check):
    got = deploy_check(abe_run[0])
    assert set(got) >= {"embedding", "attention"} and "logits" not in got


def test_monai_runner_and_medsim_train_read_the_same_configuration():
    """``python -m monai.bundle run --config_file "['bundles/isic_dsl/configs/train.json',
    'bundles/isic_abe/configs/train.json']"`` and ``medsim train bundles/isic_abe`` parse the same files in the same
    order, so they run the same configuration."""
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files

    root = BUNDLE.parent
    monai_files = [str(root / "isic_dsl" / "configs" / "train.json"), str(BUNDLE / "configs" / "train.json")]
    ours = _bundle_files(BUNDLE, None)
    assert [str(Path(f).resolve()) for f in ours] == [str(Path(f).resolve()) for f in monai_files]
    assert ConfigParser.load_config_files(ours) == ConfigParser.load_config_files(monai_files)
