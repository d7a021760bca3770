"""Fixtures of the export tests: one tiny trained run (resnet10 at 1/4 width, 32×32, one epoch on the embedded
sample: a few seconds) and its ONNX export, shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "isic_dsl"
TINY = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "embedding_dim": 32,
        "batch_size": 16, "eval_batch_size": 32, "min_neurons": 4,
        "train#handlers#4#_disabled_": True, "train#handlers#5#_disabled_": True}  # no TensorBoard, no progress bar


@pytest.fixture(scope="session")
def tiny_run(sample_root, tmp_path_factory) -> Path:
    """A finished run directory (config.json, best.pt, last.pt, split.json) trained through the bundle."""
    from medsim.engines.workflow import train_bundle

    out = tmp_path_factory.mktemp("export_run") / "tiny"
    train_bundle(BUNDLE, dataset_dir=str(sample_root / "derm"), output_dir=str(out), overrides=dict(TINY))
    assert (out / "config.json").is_file() and (out / "best.pt").is_file()
    return out


@pytest.fixture(scope="session")
def loaded(tiny_run):
    from medsim.export.run import load_run

    return load_run(tiny_run)


@pytest.fixture(scope="session")
def exported(loaded, tmp_path_factory) -> dict:
    """``export_onnx`` of the tiny run (opset 17, batch 2) into a fresh folder."""
    from medsim.export import export_onnx

    return export_onnx(loaded, tmp_path_factory.mktemp("export_onnx"), opset=17, batch=2)
