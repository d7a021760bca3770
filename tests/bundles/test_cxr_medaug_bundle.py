"""bundles/cxr_medaug: MedAug (MoCo v2 with patient-metadata positive pairs) trains from its bundle on a CSV
datalist of grayscale X-rays split by patient; the criterion is one config id; the run exports like any other."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "cxr_medaug"
TINY = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "batch_size": 8,
        "eval_batch_size": 16, "embedding_dim": 16, "queue_size": 64,
        "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}


@pytest.fixture(scope="module")
def cxr_csv(tmp_path_factory) -> Path:
    """16 patients x 3 studies (two PA, one AP) of synthetic 48x48 grayscale 'X-rays', NIH-style metadata."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cxr")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for p in range(16):
        base = rng.integers(0, 255, (48, 48)).astype(np.float32)
        for f, view in enumerate(["PA", "PA", "AP"]):
            name = f"{p:08d}_{f:03d}.png"
            img = np.clip(base * 0.8 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(root / "images" / name)
            rows.append({"image": name, "patient_id": str(1000 + p), "follow_up": str(f), "view_position": view,
                         "binary_label": "abnormal" if p % 2 else "normal"})
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "metadata.csv"


def _train(cxr_csv, out, variant=None, **extra):
    from medsim.engines.workflow import train_bundle

    return train_bundle(BUNDLE, variant=variant, dataset_dir=str(cxr_csv), output_dir=str(out),
                        overrides={**TINY, **extra})


@pytest.mark.parametrize("variant,criterion", [(None, "same_patient"), ("moco", "none"),
                                               ("same_view", "same_patient_same_view"),
                                               ("diff_followup", "same_patient_diff_followup")])
def test_each_criterion_trains_on_patient_split_xrays(cxr_csv, tmp_path, variant, criterion):
    from medsim.data.splits import load_split

    out = tmp_path / "run"
    res = _train(cxr_csv, out, variant)
    assert 0 <= res["nmi"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["criterion"] == criterion and config["ssl"]["_target_"] == "medsim.ssl.MoCoV2"
    split = load_split(out / "split.json")
    patients = {k: {it["patient"] for it in split[k]} for k in ("training", "validation", "test")}
    assert not patients["training"] & patients["test"] and not patients["training"] & patients["validation"]
    assert all(str(it["patient"]).startswith("p-") for k in patients for it in split[k])  # hashed, never in clear
    text = (out / "split.json").read_text() + (out / "config.json").read_text() + (out / "run.json").read_text()
    assert "1003" not in text and "patient_id" not in (out / "run.json").read_text()
    record = json.loads((out / "run.json").read_text())
    assert record["network"]["in_channels"] == 1


def test_medaug_pairs_come_from_the_same_patient(cxr_csv, tmp_path):
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files

    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(BUNDLE, "same_view")))
    parser.update({"dataset_dir": str(cxr_csv), "output_dir": str(tmp_path / "p"), "image_size": 32})
    items = parser.get_parsed_content("train#datalist")
    pairs = parser.get_parsed_content("train#preprocessing").candidates.partners
    by_image = {it["image"]: it for it in items}
    for image, partners in pairs.items():
        for q in partners:
            assert by_image[q]["patient"] == by_image[image]["patient"] and by_image[q]["view"] == by_image[image]["view"]
    views = parser.get_parsed_content("train#preprocessing")(items[0])["views"]
    assert len(views) == 2 and views[0].shape == (1, 32, 32)


def test_the_cxr_run_deploys(cxr_csv, tmp_path, deploy_check):
    out = tmp_path / "run"
    _train(cxr_csv, out)
    got = deploy_check(out)
    assert got["embedding"].shape[1] == 16
