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


def _workflow(sample_root: Path, out: Path):
    """The bundle's tiny config as MONAI's runner parses it (CPU), initialized."""
    from monai.bundle import ConfigWorkflow

    from medsim.engines.workflow import _bundle_files

    wf = ConfigWorkflow(config_file=_bundle_files(BUNDLE, None), meta_file=str(BUNDLE / "configs" / "metadata.json"),
                        workflow_type="train", logging_file=False, bundle_root=str(BUNDLE),
                        dataset_dir=str(sample_root / "ct"), output_dir=str(out), device="$torch.device('cpu')",
                        **{k: v for k, v in TINY.items() if "#" not in k})
    wf.initialize()
    return wf


def test_monai_bundle_parses_the_same_config(sample_root, tmp_path):
    """The config file list MONAI's runner is given builds the same trainer (SupervisedTrainer on the SAM wrapper
    with views_prepare_batch) without medsim's launcher."""
    from monai.engines import SupervisedTrainer

    from medsim.ssl import SAM, SAMLoss

    wf = _workflow(sample_root, tmp_path / "run")
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


def test_validation_measures_the_same_pairs_every_epoch(sample_root, tmp_path):
    """val_match selects the checkpoint, so every validation (one per epoch) scores the same seeded crop pairs: two
    passes of the same network see identical pairs and give identical metrics."""
    from ignite.engine import Events

    wf = _workflow(sample_root, tmp_path / "run")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    pairs: list[list[torch.Tensor]] = []
    evaluator.add_event_handler(Events.EPOCH_STARTED, lambda e: pairs.append([]))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: pairs[-1].extend(
        [e.state.batch["pos_0"], e.state.batch["pos_1"], *e.state.batch["views"]]))
    metrics = []
    for _ in range(3):
        evaluator.run()
        metrics.append(dict(evaluator.state.metrics))
    assert pairs[0] and all(len(p) == len(pairs[0]) for p in pairs)
    assert all(torch.equal(a, b) for p in pairs[1:] for a, b in zip(pairs[0], p))
    assert metrics[0] == metrics[1] == metrics[2] and metrics[0]["val_match_error"] > 0


def _volumes(root: Path, names) -> None:
    import nibabel as nib
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / f"{name}.nii.gz")


def test_a_reused_split_must_list_the_volumes_of_its_dataset(tmp_path):
    from medsim.data.volumes import volume_datalists
    from medsim.errors import MedsimError

    data, run = tmp_path / "data", tmp_path / "run"
    _volumes(data, "abcde")
    lists = volume_datalists(data, run)
    assert volume_datalists(data, run) == lists  # the same volumes: reused
    (data / "b.nii.gz").unlink()
    _volumes(data, ["f"])
    with pytest.raises(MedsimError) as e:
        volume_datalists(data, run)
    msg = str(e.value)
    assert str(run / "split.json") in msg and "split made for other data" in msg
    assert "1 case(s) in the split but not in the dataset: b.nii.gz" in msg
    assert "1 case(s) in the dataset but not in the split: f.nii.gz" in msg
    _volumes(tmp_path / "other", "abcde")  # another folder, same file names
    with pytest.raises(MedsimError, match="dataset .*asked: .*other"):
        volume_datalists(tmp_path / "other", run)


def test_training_refuses_a_run_folder_whose_split_lists_other_volumes(tmp_path, capsys):
    from medsim.cli import main
    from medsim.data.volumes import volume_datalists

    data, run = tmp_path / "data", tmp_path / "run"
    _volumes(data, "abcde")
    volume_datalists(data, run)
    (data / "c.nii.gz").unlink()
    with pytest.raises(SystemExit) as e:
        main(["train", str(BUNDLE), "--dataset-dir", str(data), "--output", str(run), "-o", "max_epochs=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "split.json" in err and "c.nii.gz" in err and "Traceback" not in err, err
    assert not (run / "run.json").exists() and not (run / "config.json").exists()  # refused before any write


def _evaluate(run_dir: Path, capsys, *args: str):
    from medsim.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run_dir), *args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_evaluate_scores_point_matching_on_the_test_pairs_not_nmi(tiny_sam_run, tmp_path, capsys):
    """`medsim evaluate` on a ct_sam run: the label-free point matching of training's final test (same pairs, same
    numbers), written as eval_<split>.json / .md; no retrieval score on label -1."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_sam_run, run)
    at_training = json.loads((run / "eval_test.json").read_text())
    code, out, err = _evaluate(run, capsys)
    assert code == 0, err
    assert "nmi" not in out.lower() and "R@1" not in out and "match" in out
    res = json.loads((run / "eval_test.json").read_text())
    assert res["split"] == "test" and res["checkpoint"] == "best.pt" and "nmi" not in res
    for key in ("match", "error", "median_error", "tolerance", "n_points"):
        assert res[key] == pytest.approx(at_training[key], abs=1e-6), key
    assert res["n_points"] == 8 and 0 <= res["match"] <= 1 and "match" in (run / "eval_test.md").read_text()
    code, _, err = _evaluate(run, capsys, "--split", "validation")
    assert code == 0 and json.loads((run / "eval_validation.json").read_text())["n_points"] == 8, err


def test_evaluate_refuses_an_unlabelled_run_without_a_label_free_evaluation(tiny_sam_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_sam_run, run)
    record = json.loads((run / "run.json").read_text())
    del record["evaluation"]  # a run recorded before label-free evaluations
    (run / "run.json").write_text(json.dumps(record))
    (run / "eval_test.json").unlink()
    code, out, err = _evaluate(run, capsys)
    assert code == 2 and "unlabelled" in err and "Traceback" not in err, err
    assert not (run / "eval_test.json").exists() and "nmi" not in out.lower()
