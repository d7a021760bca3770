"""benchmarks/ct_real.py: the run summary reads what a run folder holds, and organ centroids are world (RAS mm)
points of the label map (checked against a hand-made map with a known affine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ct_real as C  # noqa: E402


def test_run_summary_reports_cost_loss_and_the_metric_direction(tmp_path):
    recs = [{"epoch": 1, "loss": 9.0, "val_match": 0.1, "seconds": 20.0},
            {"epoch": 2, "loss": 8.0, "val_match": 0.4, "seconds": 22.0},
            {"epoch": 3, "loss": 7.5, "val_match": 0.3, "seconds": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "run.json").write_text(json.dumps({"bundle": "ct_sam"}))
    (tmp_path / "split.local.json").write_text(json.dumps({"training": [{"image": "a/ct.nii.gz"}],
                                                           "validation": [], "test": [{"image": "b/slices"}]}))
    s = C.run_summary(tmp_path)
    assert s["epochs"] == 3 and s["seconds_per_epoch"] == 22.0 and s["loss"] == [9.0, 7.5]
    assert s["metric"] == "val_match" and s["metric_first_last_best"] == [0.1, 0.3, 0.4]  # best: the highest
    assert s["split"] == {"training": ["a/ct.nii.gz"], "validation": [], "test": ["b/slices"]}


def test_centroids_are_world_points_of_the_label_map(tmp_path):
    import nibabel as nib

    data = np.zeros((20, 20, 10), np.uint8)
    data[2:6, 4:8, 1:3] = 5  # liver: 4*4*2 = 32 voxels: too few to count as an organ
    data[10:16, 10:14, 4:8] = 1  # spleen: 96 voxels, centre (12.5, 11.5, 5.5)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 100.0]
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "labels.nii.gz"))
    c = C.centroids(tmp_path / "labels.nii.gz")
    assert set(c) == {"spleen"}
    np.testing.assert_allclose(c["spleen"], [12.5 * 2 - 10, 11.5 * 3 + 5, 5.5 * 4 + 100])
