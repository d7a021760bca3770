"""bundles/ct_sam: SAM (Yan et al., TMI 2022) trains through MONAI's plain SupervisedTrainer on unlabelled volumes
(paired 3-D crops, views_prepare_batch, the loss reading the point pairs from the target), selects its checkpoint on
label-free point matching, and MONAI's own runner parses and runs the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "ct_sam"
TINY = {"max_epochs": 4, "image_size": [16, 16, 16], "backbone": "resnet10", "widen_factor": 0.25, "global_dim": 16,
        "local_dim": 16, "n_points": 16, "n_hard": 16, "n_random": 16, "items_per_epoch": 8,
        "learning_rate": 0.003, "train#output_handlers#0#_disabled_": True,
        "train#output_handlers#1#_disabled_": True}


@pytest.fixture(scope="module")
def sam_run(sample_root, tmp_path_factory):
    from medsim.engines.workflow import train_bundle

    out = tmp_path_factory.mktemp("ct_sam") / "run"
    torch.set_num_threads(1)
    res = train_bundle(BUNDLE, dataset_dir=str(sample_root / "ct"), output_dir=str(out), overrides=dict(TINY))
    return out, res


def test_sam_trains_on_the_sample_volume_and_the_loss_goes_down(sam_run):
    from medsim.engines.runs import load_checkpoint

    out, res = sam_run
    assert {"best.pt", "last.pt", "metrics.jsonl", "run.json", "split.json", "eval_test.json"} <= {
        p.name for p in out.iterdir()}
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    losses = [r["loss"] for r in recs]
    print("ct_sam epoch losses", [round(v, 3) for v in losses], "val_match", [r["val_match"] for r in recs])
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3
    assert all(0 <= r["val_match"] <= 1 and r["val_match_error"] >= 0 for r in recs)
    assert any(r["improved"] for r in recs)
    assert 0 <= res["match"] <= 1 and res["n_points"] == 16 and res["tolerance"] == 2.0  # local stride 2
    # the run's network is the SAMNet encoder alone: what export and landmark search load
    record = json.loads((out / "run.json").read_text())
    assert record["network"]["_target_"] == "medsim.nn.SAMNet"
    assert record["eval_preprocessing"]["_target_"] == "medsim.data.transforms.ct3d_transforms"
    ckpt = load_checkpoint(out / "best.pt")
    assert set(ckpt["network"]) == {k[len("encoder."):] for k in ckpt["ssl"] if k.startswith("encoder.")}


def test_volumes_are_split_by_volume(tmp_path):
    import nibabel as nib
    import numpy as np

    from medsim.data.volumes import find_volumes, volume_datalists

    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for f in ("ct.nii.gz", "labels.nii.gz"):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "data" / name / f)
    (tmp_path / "data" / "a" / "masks").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "data" / "a" / "masks" / "x.nii")
    found = find_volumes(tmp_path / "data")
    assert [p.parent.name for p in found] == ["a", "b", "c", "d", "e"] and all(p.name == "ct.nii.gz" for p in found)
    lists = volume_datalists(tmp_path / "data", tmp_path / "run")
    names = {k: {Path(it["image"]).parent.name for it in lists[k]} for k in ("training", "validation", "test")}
    assert lists["held_out"] and sum(map(len, names.values())) == 5 and all(names.values())
    assert not names["training"] & (names["validation"] | names["test"])
    assert "ct.nii.gz" not in (tmp_path / "run" / "split.json").read_text()  # paths stay in split.local.json
    assert volume_datalists(tmp_path / "data", tmp_path / "run") == lists  # reused


def test_monai_bundle_parses_the_same_config(sample_root, tmp_path):
    """The config file list MONAI's runner is given builds the same trainer (SupervisedTrainer on the SAM wrapper
    with views_prepare_batch) without medsim's launcher."""
    from monai.bundle import ConfigWorkflow
    from monai.engines import SupervisedTrainer

    from medsim.engines.workflow import _bundle_files
    from medsim.ssl import SAM, SAMLoss

    wf = ConfigWorkflow(config_file=_bundle_files(BUNDLE, None), meta_file=str(BUNDLE / "configs" / "metadata.json"),
                        workflow_type="train", logging_file=False, bundle_root=str(BUNDLE),
                        dataset_dir=str(sample_root / "ct"), output_dir=str(tmp_path / "run"),
                        device="$torch.device('cpu')", **{k: v for k, v in TINY.items() if "#" not in k})
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert type(trainer) is SupervisedTrainer and isinstance(trainer.network, SAM)
    assert isinstance(trainer.loss_function, SAMLoss)
    batch = next(iter(trainer.data_loader))
    assert batch["pos_0"].shape == (2, 16, 3) and len(batch["views"]) == 2


@pytest.mark.slow
def test_monai_bundle_run_trains_ct_sam(sample_root, tmp_path, monai_bundle_run):
    out = tmp_path / "cli"
    r = monai_bundle_run(BUNDLE, sample_root / "ct", out, {**TINY, "max_epochs": 1})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test point matching" in r.stdout and (out / "eval_test.json").is_file()
