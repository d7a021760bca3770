"""One preprocessing spec (issue 10 item 4): the manifest's preprocessing section is computed from the spec a run
records (medsim.preprocessing.describe), and it names the same steps and values as the MONAI pipeline the same spec
builds. tests/deploy/test_engine.py and test_volume.py run the NumPy runtime on these descriptions against MONAI."""

from __future__ import annotations

import pytest

from medsim.engines.runs import build_spec
from medsim.preprocessing import IMAGENET_MEAN, IMAGENET_STD, describe

SPECS = [
    {"_target_": "medsim.data.transforms.rgb2d_transforms", "spatial_size": [64, 48], "train": False},
    {"_target_": "medsim.data.transforms.rgb2d_transforms", "spatial_size": [32, 32], "normalize": False},
    {"_target_": "medsim.data.transforms.gray2d_transforms", "spatial_size": [32, 24]},
    {"_target_": "medsim.data.transforms.ct3d_transforms", "roi_size": [32, 32, 16], "pixdim": [2.0, 2.0, 3.0],
     "hu_window": [-100.0, 200.0]},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["_target_"].rsplit(".", 1)[1] + str(len(s)))
def test_description_follows_the_pipeline_the_spec_builds(spec):
    pipeline = build_spec(spec)
    desc = describe(spec)
    steps = [type(t).__name__.lstrip("_") for t in pipeline.transforms]
    assert desc["steps"] == steps and desc["spec"] == spec
    by_name = {type(t).__name__: t for t in pipeline.transforms}
    if "Resized" in by_name:
        r = by_name["Resized"].resizer
        assert desc["spatial_size"] == list(r.spatial_size) and desc["resize_mode"] == str(getattr(r.mode, "value", r.mode))
    if "NormalizeIntensityd" in by_name:
        n = by_name["NormalizeIntensityd"].normalizer
        assert desc["mean"] == list(n.subtrahend) == list(IMAGENET_MEAN)
        assert desc["std"] == list(n.divisor) == list(IMAGENET_STD)
    else:
        assert desc["mean"] is None and desc["std"] is None
    if "ScaleIntensityRanged" in by_name:
        s = by_name["ScaleIntensityRanged"].scaler
        assert desc["scale"] == {"from": [s.a_min, s.a_max], "to": [s.b_min, s.b_max], "clip": s.clip}
    if "Spacingd" in by_name:
        t = by_name["Spacingd"]
        assert desc["pixdim"] == [float(v) for v in t.spacing_transform.pixdim]
        assert desc["spacing"] == {"mode": "bilinear", "padding_mode": str(getattr(t.padding_mode[0], "value", t.padding_mode[0])),
                                   "align_corners": bool(t.align_corners[0]),
                                   "diagonal": bool(t.spacing_transform.diagonal),
                                   "scale_extent": bool(t.scale_extent[0])}
        assert desc["axcodes"] == str(by_name["Orientationd"].ornt_transform.axcodes)
        p = by_name["SpatialPadd"].padder
        assert desc["pad"] == {"method": str(getattr(p.method, "value", p.method)), "mode": str(getattr(p.mode, "value", p.mode))}
        assert desc["spatial_size"] == list(p.spatial_size)


def test_only_eval_pipelines_of_medsim_factories_are_described():
    with pytest.raises(ValueError, match="eval pipeline"):
        describe({**SPECS[0], "train": True})
    with pytest.raises(ValueError, match="no preprocessing description"):
        describe({"_target_": "medsim.data.transforms.make_transforms"})


def test_the_export_manifest_carries_the_runs_spec(loaded, exported):
    prep = exported["manifest"]["preprocessing"]
    assert prep["spec"] == loaded.record["eval_preprocessing"] and prep == describe(loaded.record["eval_preprocessing"])


def test_the_runtime_refuses_a_description_without_steps_instead_of_guessing(sample_root):
    """Guessing the steps would normalise a gray image by its own mean/std (output in [-1.4, 1.4], not [0, 1])."""
    import numpy as np

    from medsim.runtime.errors import UnsupportedPreprocessing
    from medsim.runtime.preprocess import preprocess

    image = next((sample_root / "derm" / "images").glob("*.png"))
    desc = describe(SPECS[2])
    x = preprocess(image, {"preprocessing": desc, "input": {"name": "image"}})
    assert 0.0 <= float(np.min(x)) and float(np.max(x)) <= 1.0
    del desc["steps"]
    with pytest.raises(UnsupportedPreprocessing, match="no 'steps'; re-export"):
        preprocess(image, {"preprocessing": desc, "input": {"name": "image"}})
