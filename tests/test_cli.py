"""The CLI: fast help, one-line errors with exit code 2, --debug tracebacks, strict vs lenient runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from medsim.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_help_is_lazy():
    code = ("import sys, medsim.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(medsim.cli.cli, ['--help']); "
            "print(r.exit_code, 'torch' in sys.modules, 'monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "False", "False"]


def test_help_lists_groups(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for group in ("data", "train", "evaluate", "export", "index", "search", "localize"):
        assert f"\n  {group} " in out


def test_inspect_sample(sample_root, capsys):
    code, out, _ = run(["data", "inspect", str(sample_root / "derm")], capsys)
    assert code == 0
    assert "items    48 usable" in out
    for c in ("round", "ring", "lobed", "streaks"):
        assert any(ln.split() == [c, "12", "25.0%"] for ln in out.splitlines())
    assert "shapes   32x32 (48)" in out


@pytest.fixture
def broken_folder(sample_root, tmp_path):
    """The sample's derm folder under a path with spaces and unicode, with two corrupt images."""
    root = tmp_path / "Dermatologie ü" / "derm set"
    shutil.copytree(sample_root / "derm", root)
    imgs = sorted((root / "images").glob("*.png"))
    imgs[0].write_bytes(imgs[0].read_bytes()[:50])
    imgs[1].write_bytes(b"")
    return root, [imgs[0].name, imgs[1].name]


def test_split_strict_stops_with_every_bad_file(broken_folder, tmp_path, capsys):
    root, bad = broken_folder
    out_json = tmp_path / "split.json"
    code, out, err = run(["data", "split", str(root), "--by", "lesion_id", "--out", str(out_json)], capsys)
    assert code == 2
    assert "Traceback" not in err and "nothing was trained" in err
    assert all(name in err for name in bad)
    assert not out_json.exists()


def test_split_lenient_continues_and_reports(broken_folder, tmp_path, capsys):
    root, bad = broken_folder
    out_json = tmp_path / "split.json"
    code, out, err = run(["data", "split", str(root), "--out", str(out_json), "--lenient"], capsys)
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert sum(doc["meta"]["counts"].values()) == 46 and doc["meta"]["skipped"] == 2
    report = json.loads(out_json.with_suffix(".skipped.json").read_text())
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in report["skipped"]) == sorted(bad)
    assert "training" in out and "validation" in out


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = run(["data", "inspect", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("error: ") and "no such file or directory" in err
    with pytest.raises(Exception) as e:
        main(["--debug", "data", "inspect", str(tmp_path / "nope")])
    assert "no such file" in str(e.value)




def test_sample_command(tmp_path, capsys):
    code, out, _ = run(["data", "sample", str(tmp_path / "s")], capsys)
    assert code == 0 and (tmp_path / "s" / "derm" / "HAM10000_metadata.csv").is_file()
    assert (tmp_path / "s" / "dicom").is_dir() and (tmp_path / "s" / "ct" / "labels.nii.gz").is_file()


def test_prepare_on_source(sample_root, tmp_path, capsys):
    code, out, err = run(["data", "prepare", str(sample_root / "derm"), "--out", str(tmp_path / "p"),
                          "--size", "32"], capsys)
    assert code == 0, err
    assert "batch (8, 3, 32, 32)" in out and "masks (8, 1, 32, 32)" in out
    assert (tmp_path / "p" / "derm_preview.png").stat().st_size > 1000
    assert json.loads((tmp_path / "p" / "derm_split.json").read_text())["meta"]["by"] == "lesion_id"


def test_train_evaluate_cli(sample_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(sample_root / "derm"), "--output",
                          str(run_dir), "-o", "max_epochs=1", "-o", "image_size=32", "-o", "backbone=resnet10",
                          "-o", "widen_factor=0.25", "-o", "train#output_handlers#1#_disabled_=true"], capsys)
    assert code == 0, err
    assert "NMI" in out and "R@1" in out and (run_dir / "best.pt").is_file()
    code, out, err = run(["evaluate", str(run_dir), "--split", "validation"], capsys)
    assert code == 0, err
    header, _, row = out.strip().splitlines()[:3]
    cols = [c.strip() for c in header.strip("|").split("|")]
    vals = [c.strip() for c in row.strip("|").split("|")]
    assert "nmi" in cols and "R@1" in cols
    r = json.loads((run_dir / "eval_validation.json").read_text())
    assert float(vals[cols.index("nmi")]) == pytest.approx(r["nmi"], abs=1e-4)
    assert (run_dir / "eval_validation.json").is_file() and (run_dir / "eval_validation.md").is_file()


def test_train_errors_exit_2(tmp_path, capsys):
    code, _, err = run(["train", "bundles/isic_dsl", "--variant", "mmll"], capsys)
    assert code == 2 and "did you mean 'mml'" in err
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(tmp_path), "--output",
                        str(tmp_path / "o")], capsys)
    assert code == 2 and "cannot tell the dataset layout" in err and "Traceback" not in err
    code, _, err = run(["evaluate", str(tmp_path)], capsys)
    assert code == 2 and "best.pt: not found" in err


def test_strict_lists_bad_rows_and_bad_files_together(broken_folder, tmp_path, capsys):
    root, bad = broken_folder
    table = root / "HAM10000_metadata.csv"
    lines = table.read_text().splitlines()
    first = lines[1].split(",")
    first[1] = "ISIC_missing"  # image_id of a file that does not exist
    table.write_text("\n".join([*lines, ",".join(first)]) + "\n")
    code, _, err = run(["data", "split", str(root), "--out", str(tmp_path / "s.json")], capsys)
    assert code == 2 and "3 unusable file(s) or row(s)" in err, err
    assert all(name in err for name in bad) and "ISIC_missing" in err
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(root), "--output", str(tmp_path / "r"),
                        "--lenient", "-o", "max_epochs=1"], capsys)
    assert (tmp_path / "r" / "skipped.json").is_file(), err
    assert len(json.loads((tmp_path / "r" / "skipped.json").read_text())["skipped"]) == 3


def test_bad_overrides_and_a_run_folder_of_other_data_exit_2(sample_root, tmp_path, capsys):
    code, _, err = run(["train", "bundles/isic_dsl", "-o", "max_epoch=3"], capsys)
    assert code == 2 and "no such id" in err and "did you mean 'max_epochs'" in err
    code, _, err = run(["train", "bundles/isic_dsl", "-o", "max_epochs=abc"], capsys)
    assert code == 2 and "expects a number" in err and "Traceback" not in err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    doc = {"meta": {"source": str(tmp_path / "elsewhere"), "by": "lesion_id", "classes": ["a"], "kind": "rgb2d"},
           "training": [], "validation": [], "test": []}
    (run_dir / "split.json").write_text(json.dumps(doc))
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(sample_root / "derm"), "--output",
                        str(run_dir)], capsys)
    assert code == 2 and "split made for other data" in err and "elsewhere" in err, err


def test_folder_layout_without_group_column_trains_split_per_image(tmp_path, capsys, caplog):
    """A folder of class sub-folders has no lesion/patient column: train splits per image (warned) and records
    the grouping it used; a second run into the same folder accepts that split (resume check)."""
    from PIL import Image
    import numpy as np

    data = tmp_path / "classes"
    rng = np.random.default_rng(0)
    for c in ("benign", "malignant"):
        (data / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / c / f"{c}{i}.png")
    run_dir = tmp_path / "run"
    args = ["train", "bundles/isic_dsl", "--dataset-dir", str(data), "--output", str(run_dir),
            "-o", "train#trainer#max_epochs=1", "-o", "image_size=32", "-o", "backbone=resnet10",
            "-o", "widen_factor=0.25", "-o", "batch_size=8", "-o", "train#output_handlers#1#_disabled_=true"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "NMI" in out and (run_dir / "best.pt").is_file()
    assert any("splitting per image" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert [r.levelname for r in caplog.records if r.getMessage().startswith("epoch 1/1")] == ["INFO"]
    meta = json.loads((run_dir / "split.json").read_text())["meta"]
    assert meta["by"] == "lesion_id" and meta["grouped_by"] == "image" and meta["layout"] == "folder"
    assert sum(meta["counts"].values()) == 12
    code, out, err = run(args, capsys)  # the run is complete now; the split is reused, not refused
    assert code == 0 and "split made for other data" not in err, err


def test_train_help_lists_every_layout(capsys):
    from medsim.cli import LAYOUT_CHOICES

    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert all(name in text for name in LAYOUT_CHOICES if name != "auto")
    assert "split per image" in text


def test_threads_option_reaches_torch_and_onnxruntime(tmp_path, monkeypatch, capsys):
    """`--threads N` (and MEDSIM_THREADS) sets torch's threads and every onnxruntime session medsim opens."""
    import os

    import onnx
    import torch
    from onnx import TensorProto, helper

    from medsim.runtime.runners import CPU_EP
    from medsim.runtime.runners import ort_session as runtime_session
    from medsim.export.onnx_export import ort_session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    before = torch.get_num_threads()
    for var in ("MEDSIM_THREADS", "OMP_NUM_THREADS"):  # restored after the test
        monkeypatch.setenv(var, "")
    try:
        # the option applies while parsing, before the command runs (this one then exits 2: not a run folder)
        code, _, err = run(["evaluate", str(tmp_path), "--threads", "3"], capsys)
        assert code == 2 and "not found" in err
        assert torch.get_num_threads() == 3 and os.environ["MEDSIM_THREADS"] == "3"
        assert runtime_session(model, [CPU_EP], None).get_session_options().intra_op_num_threads == 3
        assert ort_session(model).get_session_options().intra_op_num_threads == 3
        assert ort_session(model, threads=1).get_session_options().intra_op_num_threads == 1  # explicit wins

        monkeypatch.setenv("MEDSIM_THREADS", "2")  # the environment alone, on a torch-free command
        code, _, err = run(["localize", "--model", str(tmp_path), str(model), "--out", str(tmp_path / "o")], capsys)
        assert torch.get_num_threads() == 2
        assert runtime_session(model, [CPU_EP], None).get_session_options().intra_op_num_threads == 2
        code, _, err = run(["evaluate", str(tmp_path), "--threads", "0"], capsys)
        assert code == 2 and "--threads" in err
    finally:
        torch.set_num_threads(before)


def test_train_output_shows_progress_not_noise_and_says_when_a_run_is_complete(sample_root, tmp_path):
    """In a real process: the per-epoch line is INFO and shown by default without a level prefix (warnings keep
    theirs), MONAI's nvImageCodec notices are gone, and a second `train` into the finished folder says that
    nothing was trained and how to start a new run."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "medsim.cli", "train", str(root / "bundles" / "isic_dsl"), "--dataset-dir",
           str(sample_root / "derm"), "--output", str(tmp_path / "run"), "-o", "train#trainer#max_epochs=1",
           "-o", "image_size=32", "-o", "backbone=resnet10", "-o", "widen_factor=0.25",
           "-o", "train#output_handlers#1#_disabled_=true"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = first.stderr.replace("\r", "\n").splitlines()
    epoch = [ln for ln in lines if "epoch 1/1" in ln]
    assert epoch and all(ln.lstrip().startswith("epoch 1/1") for ln in epoch), first.stderr[-2000:]
    assert "nvImageCodec" not in first.stderr and "NvImgCodec" not in first.stderr
    assert "nothing trained" not in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "WARNING medsim.engines.handlers" in again.stderr and "already complete" in again.stderr
    assert "nothing trained" in again.stdout and "--output NEW_DIR" in again.stdout
    assert "epoch 1/1" not in again.stderr


def test_prepare_preview_shows_every_class(tmp_path, capsys, monkeypatch):
    """Items come sorted by class (10 of 'a' first): the preview still shows each of the 6 classes."""
    from PIL import Image
    import numpy as np

    import medsim.viz.contact_sheet as sheet

    data = tmp_path / "classes"
    rng = np.random.default_rng(0)
    for c, n in (("a", 10), ("b", 2), ("c", 2), ("d", 2), ("e", 2), ("f", 2)):
        (data / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / c / f"{c}{i}.png")
    drawn = {}
    real = sheet.contact_sheet

    def spy(images, path, **kw):
        drawn["captions"], drawn["n"] = list(kw.get("captions") or []), len(images)
        return real(images, path, **kw)

    monkeypatch.setattr(sheet, "contact_sheet", spy)
    code, out, err = run(["data", "prepare", str(data), "--out", str(tmp_path / "p"), "--size", "16"], capsys)
    assert code == 0, err
    assert set(drawn["captions"]) == {"a", "b", "c", "d", "e", "f"} and drawn["n"] == 8
    assert (tmp_path / "p" / "classes_preview.png").is_file()


def test_null_switches_an_optional_number_off_but_text_is_still_refused():
    """Issue 12: -o split_quantile=null (back to the fixed threshold) was refused as "expects a number"."""
    from pathlib import Path

    from medsim.engines.workflow import _check_overrides, parse_overrides
    from medsim.errors import MedsimError

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "isic_dsl"
    _check_overrides(bundle, None, parse_overrides(["split_quantile=null"]))
    with pytest.raises(MedsimError, match="expects a number"):
        _check_overrides(bundle, None, parse_overrides(["split_quantile=half"]))
