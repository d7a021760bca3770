"""bundles/derm_ssl: every joint-embedding method trains from its bundle variant on the embedded sample, through
MONAI's plain SupervisedTrainer (two views, bf16); the run folder exports, deploys and indexes like any other; the
pretraining never sees the test split; a supervised bundle starts from it with -o pretrained=RUN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "derm_ssl"
TINY = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "batch_size": 16,
        "eval_batch_size": 32, "embedding_dim": 32,
        "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}
VARIANTS = ["simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "wmse"]


def _train(sample_root, out, variant=None, **extra):
    from medsim.engines.workflow import train_bundle

    ov = {**TINY, **extra}
    if variant == "wmse":  # W-MSE whitens groups of w_size > projection_dim samples
        ov.update(projection_dim=8, w_size=16)
    return train_bundle(BUNDLE, variant=variant, dataset_dir=str(sample_root / "derm"), output_dir=str(out),
                        overrides=ov)


@pytest.fixture(scope="module")
def ssl_run(sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "simclr"
    return out, _train(sample_root, out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_method_trains_from_its_variant(variant, sample_root, tmp_path):
    from medsim.engines.runs import load_checkpoint
    from medsim.ssl import METHODS

    out = tmp_path / variant
    res = _train(sample_root, out, variant, max_epochs=2)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2] and all(r["loss"] is not None for r in recs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs) and "K" not in recs[0]
    assert 0 <= res["nmi"] <= 1
    ckpt = load_checkpoint(out / "last.pt")
    assert {"network", "ssl", "optimizer", "record"} <= set(ckpt)
    config = json.loads((out / "config.json").read_text())
    cls = config["ssl"]["_target_"].rsplit(".", 1)[-1]
    assert cls in {m.__name__ for m, _ in METHODS.values()}
    # the run's network is the encoder alone: best.pt's "network" is what export and pretrained= load
    record = json.loads((out / "run.json").read_text())
    assert record["network"]["_target_"] == "medsim.nn.Embedder" and record["network"]["attention"] == "none"
    assert set(ckpt["network"]) == {k[len("encoder."):] for k in ckpt["ssl"] if k.startswith("encoder.")}


def test_the_heads_stay_out_of_the_network_checkpoint(ssl_run):
    from medsim.engines.runs import load_checkpoint

    out, _ = ssl_run
    best = load_checkpoint(out / "last.pt")
    assert not any(k.startswith(("projector", "predictor")) for k in best["network"])
    assert any(k.startswith("projector") for k in best["ssl"])


def test_pretraining_never_sees_the_test_split(ssl_run, sample_root, tmp_path):
    """The SSL run trains on its split's training items only, and a supervised run on the same data and seed draws
    the same split, so its test cases were never seen during pretraining."""
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files, bundle_datalists

    out, _ = ssl_run
    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(BUNDLE, None)))
    parser.update({"dataset_dir": str(sample_root / "derm"), "output_dir": str(out)})
    trained = {it["image"] for it in parser.get_parsed_content("train#datalist")}
    lists = bundle_datalists(str(sample_root / "derm"), str(out))
    assert trained == {it["image"] for it in lists["training"]}
    assert not trained & {it["image"] for it in lists["test"] + lists["validation"]}
    other = bundle_datalists(str(sample_root / "derm"), str(tmp_path / "supervised"))
    assert [it["image"] for it in other["test"]] == [it["image"] for it in lists["test"]]


def test_the_ssl_run_deploys_and_indexes(ssl_run, deploy_check):
    got = deploy_check(ssl_run[0])  # export (ONNX parity), torch-free engine, localizer, CaseIndex self-retrieval
    assert got["embedding"].shape[1] == 32


def test_a_supervised_bundle_starts_from_the_ssl_run(ssl_run, sample_root, tmp_path):
    from medsim.engines.workflow import train_bundle
    from medsim.errors import MedsimError
    from medsim.export.run import load_run

    out = tmp_path / "dsl"
    ov = {**TINY, "pretrained": str(ssl_run[0]), "min_neurons": 4}
    train_bundle(ROOT / "bundles" / "isic_dsl", dataset_dir=str(sample_root / "derm"), output_dir=str(out),
                 overrides=ov)
    assert load_run(out).network.embedding_dim == 32
    with pytest.raises(Exception) as info:  # MONAI's config machinery wraps it; the CLI shows the MedsimError
        train_bundle(ROOT / "bundles" / "isic_dsl", dataset_dir=str(sample_root / "derm"),
                     output_dir=str(tmp_path / "wide"), overrides={**ov, "widen_factor": 0.5})
    cause = info.value
    while cause is not None and not isinstance(cause, MedsimError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and "does not match" in str(cause) and "widen_factor=0.25" in str(cause)


@pytest.mark.slow
def test_monai_bundle_run_trains_the_ssl_variant(sample_root, tmp_path):
    """MONAI's own runner, given the metadata's config-file list plus a variant file, trains BYOL."""
    import subprocess
    import sys

    from medsim.engines.workflow import _bundle_files

    out = tmp_path / "cli"
    files = _bundle_files(BUNDLE, "byol")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--bundle_root", str(BUNDLE),
           "--dataset_dir", str(sample_root / "derm"), "--output_dir", str(out),
           *[x for k, v in TINY.items() for x in (f"--{k}", json.dumps(v))]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test NMI" in r.stdout and (out / "eval_test.json").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0
