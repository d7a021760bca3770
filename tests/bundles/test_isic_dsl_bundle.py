"""The isic_dsl bundle through MONAI's own ConfigWorkflow on tiny data: train, variants, DSL growth, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "isic_dsl"
TINY = {"max_epochs": 2, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "embedding_dim": 32,
        "batch_size": 16, "eval_batch_size": 32, "train#output_handlers#1#_disabled_": True, "min_neurons": 4}


def _workflow(out: Path, dataset: Path, variant: str | None = None, **overrides):
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE / "configs" / "train.json")]
    if variant:
        files.append(str(BUNDLE / "configs" / f"{variant}.json"))
    return ConfigWorkflow(config_file=files, meta_file=str(BUNDLE / "configs" / "metadata.json"), workflow_type="train",
                          logging_file=False, **{**TINY, "bundle_root": str(BUNDLE), "dataset_dir": str(dataset), "output_dir": str(out),
                             **overrides})


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_dsl_bundle_trains_and_reports(sample_root, tmp_path):
    wf = _workflow(tmp_path / "run", sample_root / "derm")
    wf.initialize()
    wf.run()
    wf.finalize()
    out = tmp_path / "run"
    res = json.loads((out / "eval_test.json").read_text())
    assert 0 <= res["nmi"] <= 1 and 0 <= res["R@1"] <= 1
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file() and (out / "split.json").is_file()
    recs = _records(out)
    assert [r["epoch"] for r in recs] == [1, 2] and all("val_nmi" in r and "K" in r for r in recs)
    assert any((out / "tensorboard").iterdir())
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert set(ckpt) >= {"network", "optimizer", "loss", "subspaces", "rng", "engine"}
    assert ckpt["engine"]["epoch"] == 2 and ckpt["subspaces"]["learners"] == [list(range(32))]

    # evaluate.json: the same test metrics from the saved run
    ev = _workflow(out, sample_root / "derm", "evaluate")
    ev.initialize()
    ev.run()
    again = json.loads((out / "eval_test.json").read_text())
    assert again["nmi"] == pytest.approx(res["nmi"], abs=1e-4) and again["R@1"] == pytest.approx(res["R@1"])
    assert again["map_at_r"] == pytest.approx(res["map_at_r"], abs=1e-6) and again["checkpoint"].endswith("best.pt")
    saved = dict(line.split(",") for line in (out / "eval_test" / "metrics.csv").read_text().splitlines())
    assert float(saved["nmi"]) == pytest.approx(again["nmi"]) and set(saved) >= {"R@1", "map_at_r"}  # MetricsSaver
    # inference.json: embeddings + attention maps of every image
    inf = _workflow(out, sample_root / "derm", "inference")
    inf.initialize()
    inf.run()
    import numpy as np

    npz = np.load(out / "embeddings.npz")
    assert npz["embedding"].shape == (48, 32) and npz["attention"].shape == (48, 1, 2, 2)
    np.testing.assert_allclose(np.linalg.norm(npz["embedding"], axis=1), 1.0, atol=1e-5)
    assert list(npz["classes"]) == ["round", "ring", "lobed", "streaks"]


@pytest.mark.parametrize("variant", ["margin", "mml", "triplet", "contrastive", "classifier"])
def test_variants_run(sample_root, tmp_path, variant):
    wf = _workflow(tmp_path / variant, sample_root / "derm", variant, max_epochs=1,
                   **({"k": 2} if variant == "mml" else {}))
    wf.initialize()
    wf.run()
    wf.finalize()
    rec = _records(tmp_path / variant)[0]
    assert rec["K"] == (2 if variant == "mml" else 1)
    assert 0 <= rec["val_attention_spread"] <= 1  # issue 12: logged every epoch
    if variant == "mml":
        assert rec["learner_neurons"] == [16, 16] and len(rec["cluster_sizes"]) == 2
    assert json.loads((tmp_path / variant / "eval_test.json").read_text())["nmi"] >= 0
    # the variant really changed the model/loss: classifier head, learnable β only for the margin family
    ckpt = torch.load(tmp_path / variant / "last.pt", weights_only=True)
    head = ckpt["network"].get("classifier.weight")
    assert (head is not None and tuple(head.shape) == (4, 32)) == (variant == "classifier")
    betas = [v for k, v in ckpt["loss"].items() if k.endswith("beta")]
    assert (len(betas) == 1 and betas[0].shape == (4,)) == (variant in ("margin", "mml"))


def test_dsl_grows_k_and_logs_why(sample_root, tmp_path):
    # min_delta 1.0: no epoch after the first counts as an improvement, so with patience 1 DSL splits at
    # epoch 2, and stops at epoch 3 because the split did not help
    wf = _workflow(tmp_path / "grow", sample_root / "derm", max_epochs=4, patience=1, split_min_delta=1.0,
                   finetune_epochs=0, split_threshold=0.1, min_neurons=2)
    wf.initialize()
    wf.run()
    recs = _records(tmp_path / "grow")
    assert [r["K"] for r in recs] == [1, 1, 2, 2]
    assert recs[1]["events"][0].startswith("split: val NMI has not improved for 1 epochs")
    assert sum(recs[2]["learner_neurons"]) == 32 and len(recs[2]["cluster_sizes"]) == 2
    assert recs[2]["events"][0].startswith("stop splitting") and recs[3]["phase"] == "finetune"


def test_killed_run_resumes_and_continues_the_same_way(sample_root, tmp_path):
    from ignite.engine import Events

    a = _workflow(tmp_path / "a", sample_root / "derm", max_epochs=3)
    a.initialize()
    a.run()

    b = _workflow(tmp_path / "b", sample_root / "derm", max_epochs=3)
    b.initialize()
    trainer = b.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch_length is None or trainer.state.epoch_length >= 2

    @trainer.on(Events.ITERATION_COMPLETED)
    def _kill(engine):
        # after the first iteration of epoch 2 (epoch_length >= 2): mid-epoch
        if engine.state.epoch == 2 and (engine.state.iteration - 1) % engine.state.epoch_length == 0:
            raise KeyboardInterrupt("killed mid-epoch")

    with pytest.raises(KeyboardInterrupt):
        b.run()
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["engine"]["epoch"] == 1

    c = _workflow(tmp_path / "b", sample_root / "derm", max_epochs=3)  # same run directory: resume
    c.initialize()
    c.run()
    ra, rb = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["val_nmi"] == pytest.approx(y["val_nmi"], abs=1e-4)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["network"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["network"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_monai_bundle_run_cli(sample_root, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json"),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--bundle_root", str(BUNDLE),
           "--dataset_dir", str(sample_root / "derm"), "--output_dir", str(out),
           *[x for k, v in {**TINY, "max_epochs": 1}.items() for x in (f"--{k}", json.dumps(v))]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test NMI" in r.stdout and (out / "eval_test.json").is_file()


def test_dsl_scores_neurons_on_class_balanced_batches_of_the_training_items(sample_root, tmp_path):
    """Issue 12: the bundle's SubspaceHandler scores on class-mixed batches of the training items (a
    ClusterBatchSampler over the cluster dataset), not on the unshuffled, class-sorted cluster pass."""
    from medsim.engines import ClusterBatchSampler

    wf = _workflow(tmp_path / "run", sample_root / "derm")
    wf.initialize()
    handler = wf.parser.get_parsed_content("method#handlers")[0]
    sampler = handler.score_loader.batch_sampler
    assert isinstance(sampler, ClusterBatchSampler) and sampler.assignment is None
    assert handler.score_loader.dataset is handler.cluster_loader.dataset
    batch = next(iter(handler.score_loader))
    assert len(set(batch["label"].tolist())) > 1 and len(batch["label"]) == TINY["batch_size"]
    assert handler.cluster_features == "penultimate"
    train_sampler = wf.parser.get_parsed_content("train#sampler")
    assert train_sampler.batches_per_cluster == "equal"
