"""docs/adding-a-method.md, done for real: a new method is three new files — a network module under medsim.nn, a
loss module under medsim.losses, a bundle config — and no edit to any core file. The two modules are written to a
temporary folder and registered under their package names (as if dropped into medsim/nn and medsim/losses); the
method then trains, evaluates, exports with parity and localizes through the ordinary entry points."""

from __future__ import annotations

import importlib.util
import json
import shutil
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

NETWORK = '''
"""A toy method: a two-conv trunk, a 1x1 attention score, attention-weighted pooling, a linear embedding."""
import torch
import torch.nn.functional as F
from torch import nn

from medsim.nn.base import EmbedderBase
from medsim.nn.geometry import trace_geometry


class ToyEmbedder(EmbedderBase):
    def __init__(self, in_channels: int = 3, embedding_dim: int = 16, width: int = 8):
        super().__init__()
        self.in_channels, self.embedding_dim = in_channels, embedding_dim
        self.trunk = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.score = nn.Conv2d(width, 1, 1)
        self.embed = nn.Linear(width, embedding_dim)

    def compute(self, x):
        f = self.trunk(x)
        a = torch.sigmoid(self.score(f))
        pooled = (f * a).sum((2, 3)) / a.sum((2, 3)).clamp_min(1e-6)
        return {"embedding": F.normalize(self.embed(pooled), dim=1), "attention": a}

    def attention_geometry(self, input_size):
        return trace_geometry(input_size, self.trunk, self.score)
'''

LOSS = '''
"""Pairwise hinge: mean squared distance of positive pairs + mean [margin - distance]+^2 of negative pairs."""
import torch

from medsim.losses.base import EmbeddingLoss


class PairHingeLoss(EmbeddingLoss):
    def __init__(self, margin: float = 0.5):
        super().__init__()
        self.margin = margin

    def compute_loss(self, embedding, labels, logits):
        d = torch.cdist(embedding, embedding)
        same = labels[:, None] == labels[None, :]
        off = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos, neg = d[same & off], d[~same]
        zero = embedding.sum() * 0
        return (pos.pow(2).mean() if pos.numel() else zero) + \\
            (torch.relu(self.margin - neg).pow(2).mean() if neg.numel() else zero)
'''


def _register(name: str, source: str, folder: Path, monkeypatch) -> None:
    """Import ``source`` as the module ``name`` — what putting the file into the package does."""
    parent, child = name.rsplit(".", 1)
    path = folder / f"{child}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(importlib.import_module(parent), child, module, raising=False)


@pytest.fixture()
def toy_method(tmp_path, monkeypatch):
    """The three files of docs/adding-a-method.md: two modules and a bundle config (layered on isic_dsl)."""
    code = tmp_path / "code"
    code.mkdir()
    for name, source in (("medsim.nn.toy", NETWORK), ("medsim.losses.toy", LOSS)):
        _register(name, source, code, monkeypatch)
    bundle = tmp_path / "bundles" / "isic_dsl"  # a checkout's bundle; the method adds one variant file to it
    shutil.copytree(ROOT / "bundles" / "isic_dsl", bundle)
    (bundle / "configs" / "toy.json").write_text(json.dumps({
        "output_dir": "runs/toy", "embedding_dim": 16,
        "method": {"name": "toy", "loss": {"_target_": "medsim.engines.BatchLoss", "loss": "@loss"},
                   "assignment": None, "handlers": [], "state": {}},
        "network_def": {"_target_": "medsim.nn.toy.ToyEmbedder", "in_channels": 3, "embedding_dim": "@embedding_dim"},
        "loss": {"_target_": "medsim.losses.toy.PairHingeLoss", "margin": 0.5}}))
    return bundle


def test_the_loss_of_the_new_method_is_its_formula(toy_method):
    from medsim.losses.toy import PairHingeLoss

    g = torch.Generator().manual_seed(0)
    e, y = F.normalize(torch.randn(10, 4, generator=g), dim=1), torch.arange(10) % 3
    pos = [(e[i] - e[j]).norm() ** 2 for i in range(10) for j in range(10) if i != j and y[i] == y[j]]
    neg = [torch.relu(0.5 - (e[i] - e[j]).norm()) ** 2 for i in range(10) for j in range(10) if y[i] != y[j]]
    expected = torch.stack(pos).mean() + torch.stack(neg).mean()
    torch.testing.assert_close(PairHingeLoss(0.5)(e, y), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected embedding \(B, D\)"):  # the base checks the inputs
        PairHingeLoss()(torch.randn(4), y[:4])


def test_a_new_method_is_three_files_and_no_core_edit(toy_method, sample_root, tmp_path):
    from medsim.deploy.tasks import localize_images
    from medsim.engines.workflow import evaluate_run, train_bundle
    from medsim.export.pipeline import export_run

    run = tmp_path / "run"
    from medsim.engines.workflow import bundle_variants

    assert "toy" in bundle_variants(toy_method)  # found in the folder: nothing lists variants
    summary = train_bundle(toy_method, variant="toy", dataset_dir=str(sample_root / "derm"), output_dir=str(run),
                           overrides={"max_epochs": 2, "image_size": 32, "batch_size": 16,
                                      "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True})
    assert 0 <= summary["nmi"] <= 1 and 0 <= summary["R@1"] <= 1
    record = json.loads((run / "run.json").read_text())
    assert record["network"] == {"_target_": "medsim.nn.toy.ToyEmbedder", "in_channels": 3, "embedding_dim": 16}
    assert evaluate_run(run)["R@1"] == pytest.approx(summary["R@1"])  # rebuilt from run.json, weights-only
    out = export_run(run, tmp_path / "export", opt_batch=2)
    manifest = out["manifest"]
    assert manifest["network"]["class"] == "ToyEmbedder" and manifest["embedding_dim"] == 16
    assert manifest["attention_geometry"]  # derived from the toy's layers: localize places its cells
    images = sorted((sample_root / "derm" / "images").glob("*.png"))[:2]
    loc = localize_images(tmp_path / "export", images, tmp_path / "loc", progress=False)
    assert loc["images"] == 2 and len(list((tmp_path / "loc").glob("c-*_mask.png"))) == 2
