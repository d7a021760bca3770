"""Data-parallel training (``medsim train --nproc 2``: torchrun, gloo on CPU) equals one process that sees the whole
batch: the same epoch losses, validation metrics, DSL decisions and final weights (issue 15).

BatchNorm is frozen in these runs (``freeze_bn=true``): ``torch.nn.SyncBatchNorm`` runs on CUDA only, so on CPU each
process would normalise with its half of the batch — the one thing that is not the one-process computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _train(tmp: Path, name: str, data: Path, overrides: dict, nproc: int, variant: str | None) -> Path:
    out = tmp / name
    cmd = [sys.executable, "-m", "medsim.cli", "train", str(ROOT / "bundles" / "isic_dsl"), "--dataset-dir", str(data),
           "--output", str(out), "--allow-expressions", "--nproc", str(nproc), "--threads", "1",
           *(["--variant", variant] if variant else [])]
    for k, v in overrides.items():
        cmd += ["-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return out


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["network"]


def _assert_same_run(one: Path, two: Path, *, atol: float) -> list[dict]:
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) > 0
    for a, b in zip(h1, h2):
        assert a["loss"] == pytest.approx(b["loss"], abs=atol, rel=1e-4), (a["epoch"], a["loss"], b["loss"])
        for key in ("val_nmi", "val_R@1", "K", "learner_neurons", "cluster_sizes", "events", "phase"):
            if key in a:
                assert a[key] == (pytest.approx(b[key], abs=1e-4) if isinstance(a[key], float) else b[key]), key
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1 if w1[k].is_floating_point())
    print(f"largest weight difference after {len(h1)} epochs: {worst:.2e}")
    assert worst <= atol
    assert (two / "run.json").is_file() and (two / "best.pt").is_file() and (two / "eval_test.json").is_file()
    return h2


BASE = {"max_epochs": 2, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "embedding_dim": 32,
        "batch_size": 16, "m_per_class": 4, "eval_batch_size": 32, "freeze_bn": True,
        "train#preprocessing#train": False,  # no random augmentation: both runs see the same pixels
        "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}


@pytest.mark.slow
def test_margin_loss_on_two_processes_equals_one_process_with_the_global_batch(sample_root, tmp_path):
    """Margin loss over the global batch (pairs span the two processes), no random miner: equal losses per epoch,
    equal validation NMI and equal weights after two epochs."""
    ov = {**BASE, "metric_loss#miner": None}
    one = _train(tmp_path, "one", sample_root / "derm", ov, 1, "margin")
    two = _train(tmp_path, "two", sample_root / "derm", ov, 2, "margin")
    _assert_same_run(one, two, atol=2e-5)


@pytest.mark.slow
def test_dsl_through_a_split_on_two_processes_equals_one_process(sample_root, tmp_path):
    """DSL with a split forced at the first plateau: the neuron scores (all-reduced over the processes' score
    batches), the split, rank 0's re-clustering and the routed per-learner losses give the one-process run."""
    ov = {**BASE, "metric_loss#miner": None, "max_epochs": 4, "patience": 1, "split_min_delta": 1.0,
          "min_neurons": 4, "finetune_epochs": 1}
    one = _train(tmp_path, "one", sample_root / "derm", ov, 1, None)
    two = _train(tmp_path, "two", sample_root / "derm", ov, 2, None)
    hist = _assert_same_run(one, two, atol=5e-5)
    assert max(h["K"] for h in hist) >= 2, [h.get("events") for h in hist]


@pytest.mark.slow
def test_moco_on_two_processes_keeps_one_queue_and_equals_one_process(tmp_path):
    """MoCo v2 with a queue smaller than the keys it sees: two gloo processes (DDP, InfoNCE over the gathered
    global batch, keys of both processes enqueued in rank order) give the one-process losses, the same queue on
    both ranks and the one-process queue and weights."""
    worker = Path(__file__).with_name("ddp_moco_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for nproc, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        launch = [sys.executable, str(worker)] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
        res = subprocess.run([*launch, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
    one = torch.load(f"{tmp_path / 'one'}.rank0", weights_only=True)
    r0, r1 = (torch.load(f"{tmp_path / 'two'}.rank{r}", weights_only=True) for r in (0, 1))
    np.testing.assert_allclose(r0["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    assert r0["queue_ptr"] == r1["queue_ptr"] == one["queue_ptr"] == (4 * 8) % 24
    torch.testing.assert_close(r0["queue"], r1["queue"], rtol=0, atol=0)
    torch.testing.assert_close(r0["queue"], one["queue"], rtol=1e-5, atol=1e-6)
    for k, v in one["weights"].items():
        if v.is_floating_point():
            torch.testing.assert_close(r0["weights"][k], v, rtol=1e-5, atol=1e-6, msg=k)


SMALL = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "batch_size": 16,
         "eval_batch_size": 32, "embedding_dim": 16}


@pytest.mark.slow
@pytest.mark.parametrize("bundle, data, variant, extra", [
    ("isic_abe", "derm", None, {"n_learners": 2}),                     # layered on isic_dsl's multi-GPU file
    ("derm_ssl", "derm", "moco", {"queue_size": 32}),                  # label-free: shuffled global batches
    ("ct_sam", "ct", None, {"image_size": [16, 16, 16], "embedding_dim": 32, "global_dim": 16, "local_dim": 8,
                            "n_points": 8, "n_hard": 8, "n_random": 8, "items_per_epoch": 4, "batch_size": 2}),
])
def test_every_family_trains_on_two_processes(sample_root, tmp_path, bundle, data, variant, extra):
    """One epoch of each bundle family on 2 gloo processes: the run folder is complete, written once (rank 0:
    one metrics line per epoch, one run record, the final evaluation)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medsim.cli", "train", str(ROOT / "bundles" / bundle), "--dataset-dir",
           str(sample_root / data), "--output", str(out), "--nproc", "2", *(["--variant", variant] if variant else [])]
    for k, v in {**SMALL, **extra}.items():
        cmd += ["-o", f"{k}={json.dumps(v)}"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert len(_history(out)) == 1
    assert (out / "run.json").is_file() and (out / "last.pt").is_file() and (out / "eval_test.json").is_file()
    assert sum(line.startswith("run: ") for line in res.stdout.splitlines()) == 1  # printed by rank 0 only


@pytest.mark.slow
def test_monai_bundle_run_under_torchrun_with_the_multi_gpu_file(sample_root, tmp_path):
    """The model-zoo way: ``torchrun -m monai.bundle run`` with ``multi_gpu_train.json`` added to the config files
    trains on 2 processes and rank 0 writes the checkpoints and the test evaluation."""
    bundle = ROOT / "bundles" / "isic_dsl"
    files = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "--config_file", json.dumps(files), "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(sample_root / "derm"), "--output_dir", str(out),
           *[x for k, v in {**SMALL, "train#output_handlers#0#_disabled_": True,
                            "train#output_handlers#1#_disabled_": True}.items() for x in (f"--{k}", json.dumps(v))]]
    res = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.count("test NMI") == 1 and (out / "eval_test.json").is_file() and len(_history(out)) == 1


def test_a_bundle_without_a_usable_multi_gpu_file_is_refused_naming_it(tmp_path):
    """--nproc on a bundle whose metadata is broken or names a missing multi-GPU file: a MedsimError naming the
    file and what to do, before torchrun starts."""
    import shutil

    from medsim.engines.workflow import _multi_gpu_file
    from medsim.errors import MedsimError

    bundle = tmp_path / "b"
    shutil.copytree(ROOT / "bundles" / "isic_abe", bundle)
    meta = bundle / "configs" / "metadata.json"
    meta.write_text("{not json")
    with pytest.raises(MedsimError, match="metadata.json.*fix the JSON"):
        _multi_gpu_file(bundle)
    meta.write_text(json.dumps({"config_files": {"multi_gpu_train": "missing.json"}}))
    with pytest.raises(MedsimError, match="no configs/multi_gpu_train.json.*--nproc 1"):
        _multi_gpu_file(bundle)
