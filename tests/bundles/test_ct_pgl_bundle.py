"""bundles/ct_pgl: PGL (Xie et al. 2020) and its byol3d baseline variant train through MONAI's plain
SupervisedTrainer on unlabelled volumes (paired 3-D crops with their transform, views_prepare_batch), select the
checkpoint on the validation loss (lower is better), and their encoder trunk loads exactly into the segmentation
network; MONAI's own runner parses and runs the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "ct_pgl"
TINY = {"max_epochs": 4, "image_size": [16, 16, 16], "backbone": "resnet10", "widen_factor": 0.25, "cut": "layer2",
        "embedding_dim": 16, "projection_dim": 16, "hidden_dim": 32, "n_points": 8, "items_per_epoch": 8,
        "learning_rate": 0.003, "train#output_handlers#0#_disabled_": True,
        "train#output_handlers#1#_disabled_": True}


@pytest.fixture(scope="module", params=[None, "byol3d"], ids=["pgl", "byol3d"])
def pgl_run(request, sample_root, tmp_path_factory):
    from medsim.engines.workflow import train_bundle

    out = tmp_path_factory.mktemp(f"ct_{request.param or 'pgl'}") / "run"
    torch.set_num_threads(1)
    res = train_bundle(BUNDLE, variant=request.param, dataset_dir=str(sample_root / "ct"), output_dir=str(out),
                       overrides=dict(TINY))
    return request.param, out, res


def test_the_bundle_trains_on_the_sample_and_selects_on_the_validation_loss(pgl_run):
    from medsim.engines.runs import load_checkpoint

    variant, out, res = pgl_run
    assert {"best.pt", "last.pt", "metrics.jsonl", "run.json", "split.json", "eval_test.json"} <= {
        p.name for p in out.iterdir()}
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    losses = [r["loss"] for r in recs]
    print(variant or "pgl", "epoch losses", [round(v, 3) for v in losses], "val_loss", [r["val_loss"] for r in recs])
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    # lower is better: an epoch is "improved" exactly when its val_loss is the lowest so far
    best = float("inf")
    for r in recs:
        assert r["improved"] == (r["val_loss"] <= best)
        best = min(best, r["val_loss"])
    if variant is None:  # PGL reports both terms; they add up to the total (local_weight 1)
        assert all(r["val_loss"] == pytest.approx(r["val_global"] + r["val_local"], abs=2e-4) for r in recs)
        assert res["loss"] == pytest.approx(res["global"] + res["local"], abs=1e-5)
    else:
        assert "val_local" not in recs[0] and "local" not in res
    assert res["checkpoint"] == "best.pt" and res["selected_by"] == "val_loss" and res["n_items"] == 1
    record = json.loads((out / "run.json").read_text())
    assert record["network"]["_target_"] == "medsim.nn.Embedder" and record["network"]["cut"] == "layer2"
    ckpt = load_checkpoint(out / "best.pt")
    assert set(ckpt["network"]) == {k[len("encoder."):] for k in ckpt["ssl"] if k.startswith("encoder.")}
    assert any(k.startswith("local_projector.") for k in ckpt["ssl"]) == (variant is None)


def test_the_pretrained_encoder_loads_exactly_into_the_segmentation_network(pgl_run):
    from medsim.engines.runs import load_checkpoint
    from medsim.engines.segmentation import load_encoder
    from medsim.nn.segmentation import ResNetUNet

    _, out, _ = pgl_run
    torch.manual_seed(0)
    net = ResNetUNet("resnet10", out_channels=4, cut="layer2", widen_factor=0.25, decoder_channels=(16, 16, 8, 8))
    net.eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = net(x)
    load_encoder(net, out)
    trained = {k[len("backbone."):]: v for k, v in load_checkpoint(out / "best.pt")["network"].items()
               if k.startswith("backbone.")}
    assert set(trained) == set(net.trunk.state_dict())
    assert all(torch.equal(net.trunk.state_dict()[k], v) for k, v in trained.items())
    with torch.no_grad():
        assert not torch.allclose(net(x), before)
    load_encoder(net, None)  # no run: unchanged
    assert all(torch.equal(net.trunk.state_dict()[k], v) for k, v in trained.items())


def test_evaluate_reports_the_loss_on_the_test_pairs_not_nmi(pgl_run, tmp_path, capsys):
    """`medsim evaluate` on a ct_pgl / byol3d run: the method's loss on the test split's fixed pairs (the numbers of
    training's final test), written as eval_test.json / .md; no retrieval score on unlabelled volumes."""
    import shutil

    from medsim.cli import main

    variant, out, res = pgl_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run)])
    printed = capsys.readouterr()
    assert e.value.code == 0, printed.err
    assert "nmi" not in printed.out.lower() and "R@1" not in printed.out and "loss" in printed.out
    got = json.loads((run / "eval_test.json").read_text())
    assert got["split"] == "test" and got["checkpoint"] == "best.pt" and got["n_items"] == 1 and "nmi" not in got
    assert got["loss"] == pytest.approx(res["loss"], abs=1e-5)
    assert ("local" in got) == (variant is None) and "loss" in (run / "eval_test.md").read_text()


def test_monai_bundle_parses_the_same_config(sample_root, tmp_path):
    from monai.bundle import ConfigWorkflow
    from monai.engines import SupervisedTrainer

    from medsim.engines.workflow import _bundle_files
    from medsim.ssl import BYOL, PGL, BYOLLoss, PGLLoss

    for variant, (method, loss) in {None: (PGL, PGLLoss), "byol3d": (BYOL, BYOLLoss)}.items():
        wf = ConfigWorkflow(config_file=_bundle_files(BUNDLE, variant),
                            meta_file=str(BUNDLE / "configs" / "metadata.json"), workflow_type="train",
                            logging_file=False, bundle_root=str(BUNDLE), dataset_dir=str(sample_root / "ct"),
                            output_dir=str(tmp_path / str(variant)), device="$torch.device('cpu')",
                            **{k: v for k, v in TINY.items() if "#" not in k})
        wf.initialize()
        trainer = wf.parser.get_parsed_content("train#trainer")
        assert type(trainer) is SupervisedTrainer and type(trainer.network) is method
        assert type(trainer.loss_function) is loss
        assert wf.parser.get_parsed_content("train#record").sign == -1.0  # val_loss: lower is better
        batch = next(iter(trainer.data_loader))
        assert batch["pos_0"].shape == (2, 8, 3) and batch["scale"].shape == (2, 3) and len(batch["views"]) == 2
        # validation: 4 crop pairs per validation volume, the same pairs at every validation
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        assert len(evaluator.data_loader.dataset) == 4
        values = []
        for _ in range(2):
            evaluator.run()
            values.append(evaluator.state.metrics["val_loss"])
        assert values[0] == values[1] and values[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", [None, "byol3d"])
def test_monai_bundle_run_trains_ct_pgl(sample_root, tmp_path, monai_bundle_run, variant):
    out = tmp_path / "cli"
    r = monai_bundle_run(BUNDLE, sample_root / "ct", out, {**TINY, "max_epochs": 1}, variant)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test loss" in r.stdout and (out / "eval_test.json").is_file()
