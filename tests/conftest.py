"""Shared fixtures: the real-data folder (../shared/data, skipped when absent) and a small synthetic sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSIM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _salt():
    """A fixed anonymisation salt for the whole session, so tests never create .medsim-salt files in the working
    tree and session-scoped fixtures (the tiny run and its split) hash groups the same way on every machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSIM_SALT", "test-salt")
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set MEDSIM_SHARED_DATA to point at it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The embedded sample with small parameters (shared by the session)."""
    from medsim.data.sample import make_sample

    root = tmp_path_factory.mktemp("sample")
    make_sample(root, seed=0, n_per_class=12, size=32, n_dicom=4, volume_shape=(24, 24, 16))
    return root


# ---- a tiny trained run and its ONNX export, shared by the export and deploy tests (trained once a session)
BUNDLE = ROOT / "bundles" / "isic_dsl"
TINY = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "embedding_dim": 32,
        "batch_size": 16, "eval_batch_size": 32, "min_neurons": 4,
        "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}  # no TensorBoard, no progress bar


@pytest.fixture
def tiny_overrides() -> dict:
    """A copy of the tiny recipe's bundle overrides (for tests that train their own tiny run of isic_dsl)."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_run(sample_root, tmp_path_factory) -> Path:
    """A finished run directory (config.json, best.pt, last.pt, split.json) trained through the bundle."""
    from medsim.engines.workflow import train_bundle

    out = tmp_path_factory.mktemp("export_run") / "tiny"
    train_bundle(BUNDLE, dataset_dir=str(sample_root / "derm"), output_dir=str(out), overrides=dict(TINY))
    assert (out / "config.json").is_file() and (out / "best.pt").is_file()
    return out


SAM_TINY = {"max_epochs": 1, "image_size": [16, 16, 16], "backbone": "resnet10", "widen_factor": 0.25,
            "global_dim": 16, "local_dim": 8, "n_points": 8, "n_hard": 8, "n_random": 8, "items_per_epoch": 2,
            "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}


@pytest.fixture(scope="session")
def tiny_sam_run(sample_root, tmp_path_factory) -> Path:
    """A finished tiny bundles/ct_sam run (16³ crops, ResNet10 ×0.25) on the sample CT, trained once a session."""
    import torch

    from medsim.engines.workflow import train_bundle

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sam_run") / "run"
    train_bundle(ROOT / "bundles" / "ct_sam", dataset_dir=str(sample_root / "ct"), output_dir=str(out),
                 overrides=dict(SAM_TINY))
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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_shared_data)


@pytest.fixture(scope="session")
def deploy_check(tmp_path_factory):
    """``deploy_check(run_dir)``: a trained run through the whole deployment path — ``export_run`` (ONNX +
    manifest, parity-checked), the torch-free ``EmbeddingEngine`` on its test images (outputs equal PyTorch's on
    MONAI's preprocessing to 1e-4), ``Localizer`` masks at image size, and a ``CaseIndex`` that finds each image
    itself first. Returns the engine outputs. Shared by every model family's bundle tests."""

    def check(run_dir: Path) -> dict:
        import json

        import numpy as np
        import torch

        from medsim.deploy import CaseIndex, EmbeddingEngine, Localizer
        from medsim.export.pipeline import export_run
        from medsim.export.run import load_run, preprocess_items

        out = tmp_path_factory.mktemp("deploy") / "model"
        export_run(run_dir, out, opt_batch=2)
        from medsim.data.splits import load_split

        paths = [it["image"] for it in load_split(Path(run_dir) / "split.json")["test"]][:6]
        with EmbeddingEngine(out, backend="ort-cpu", batch_size=4) as engine:
            got = engine.embed(paths, return_sizes=True)
        run = load_run(run_dir)
        with torch.no_grad():
            ref = run.network(torch.as_tensor(preprocess_items(paths, run.transform)))
        for name in engine.output_names:
            np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-4, err_msg=name)
        for att, size in zip(got["attention"], got["image_size"]):
            loc = Localizer().localize(att, size)
            assert loc.mask.shape == tuple(size) and loc.heatmap.shape == tuple(size)
        index = CaseIndex(got["embedding"].shape[1], model_id="check")
        index.add(got["embedding"], [{"id": f"c-{i:016x}"} for i in range(len(paths))])
        _, ids = index.search_arrays(got["embedding"], 1)
        assert (ids[:, 0] == np.arange(len(paths))).all()
        return got

    return check


@pytest.fixture
def adam_steps():
    """``steps(model, loss_fn, batches, n, lr)``: ``n`` Adam steps cycling over ``batches`` of ``(views, target)``;
    returns the losses and, for losses that record their terms, ``loss_fn.last`` after each step."""
    import torch

    def steps(model, loss_fn, batches, n, lr=3e-3):
        opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
        losses, terms = [], []
        for step in range(n):
            views, target = batches[step % len(batches)]
            value = loss_fn(model(views), target)
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
            terms.append(dict(getattr(loss_fn, "last", {})))
        return losses, terms

    return steps


@pytest.fixture
def monai_bundle_run():
    """``run(bundle, dataset_dir, out, overrides, variant=None)``: ``python -m monai.bundle run`` on the bundle's
    layered config files in a subprocess (cwd: ``out``'s parent); returns the ``CompletedProcess``."""
    import json
    import subprocess
    import sys

    from medsim.engines.workflow import _bundle_files

    def run(bundle, dataset_dir, out, overrides, variant=None):
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               json.dumps(_bundle_files(bundle, variant)), "--meta_file", str(bundle / "configs" / "metadata.json"),
               "--bundle_root", str(bundle), "--dataset_dir", str(dataset_dir), "--output_dir", str(out),
               *[x for k, v in overrides.items() for x in (f"--{k}", json.dumps(v))]]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(out).parent, timeout=300)

    return run
