"""Trust: a run folder and a checkpoint are data. Loading them (export, evaluate, a resumed train) runs nothing from
them; a refused command changes nothing; -o expressions need an explicit flag (issue 9, parts 1, 2 and 5)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from medsim.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_CLI = ["-o", "max_epochs=1", "-o", "image_size=32", "-o", "backbone=resnet10", "-o", "widen_factor=0.25",
            "-o", "embedding_dim=32", "-o", "batch_size=16", "-o", "min_neurons=4",
            "-o", "train#output_handlers#0#_disabled_=true", "-o", "train#output_handlers#1#_disabled_=true"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


class Boom:
    """A pickle payload that would create ``marker`` if it were ever unpickled with full pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def doctor(ckpt: Path, marker: Path) -> None:
    state = torch.load(ckpt, weights_only=True)
    state["evil"] = Boom(marker)
    torch.save(state, ckpt)


def test_no_torch_load_with_weights_only_false_in_medsim():
    """Every PyTorch file medsim reads (checkpoints, backbone weights) goes through one ``torch.load``:
    ``medsim.files.load_torch_file``, with ``weights_only=True``; no ``pickle.load(s)`` and no ``weights_only=False``
    anywhere in the package."""
    import ast
    import re

    hits = [f"{p}:{i}" for p in (ROOT / "medsim").rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(", line)]
    assert hits == []
    loads = []  # (file, enclosing function, weights_only argument) of every torch.load call
    for p in sorted((ROOT / "medsim").rglob("*.py")):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
                assert "load" not in {a.name for a in node.names}, f"{p}:{node.lineno} imports torch's load by name"
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.serialization.load"):
                fn = node
                while fn in parent and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    fn = parent[fn]
                wo = next((ast.unparse(k.value) for k in node.keywords if k.arg == "weights_only"), None)
                loads.append((p.relative_to(ROOT).as_posix(), getattr(fn, "name", "<module>"), wo))
    assert loads == [("medsim/files.py", "load_torch_file", "True")]


def test_checkpoints_are_plain_and_load_weights_only(tiny_run):
    for name in ("best.pt", "last.pt"):
        state = torch.load(tiny_run / name, weights_only=True)  # raises if anything but plain data is inside
        assert {"network", "optimizer", "rng", "engine"} <= set(state)


@pytest.mark.parametrize("which", ["best.pt", "last.pt"])
def test_a_doctored_checkpoint_is_refused_by_export_and_evaluate(run_copy, tmp_path, capsys, which):
    marker = tmp_path / "pwned"
    if which == "last.pt":
        (run_copy / "best.pt").unlink()  # export then falls back to last.pt
    doctor(run_copy / which, marker)
    code, _, err = run(["export", str(run_copy), "--out", str(tmp_path / "exp")], capsys)
    assert code == 2 and f"{run_copy / which}: refused" in err and "posix.system" in err, err
    assert "Traceback" not in err and not (tmp_path / "exp" / "model.onnx").exists()
    code, _, err = run(["evaluate", str(run_copy), "--checkpoint", which], capsys)
    assert code == 2 and f"{run_copy / which}: refused" in err, err
    assert not marker.exists()


def test_a_doctored_last_pt_is_refused_on_resume_and_the_run_folder_is_untouched(run_copy, sample_root, tmp_path,
                                                                                   capsys):
    marker = tmp_path / "pwned"
    doctor(run_copy / "last.pt", marker)
    before = snapshot(run_copy)
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(sample_root / "derm"), "--output",
                        str(run_copy), *TINY_CLI, "-o", "max_epochs=2"], capsys)
    assert code == 2 and f"{run_copy / 'last.pt'}: refused" in err and "posix.system" in err, err
    assert snapshot(run_copy) == before and not marker.exists()


def test_run_folder_expressions_never_execute(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["network"] = f"$__import__('pathlib').Path('{marker}').touch() or @network_def"
    cfg["eval"]["preprocessing"] = f"$__import__('pathlib').Path('{marker}').touch()"
    (run_copy / "config.json").write_text(json.dumps(cfg))
    code, out, err = run(["evaluate", str(run_copy)], capsys)
    assert code == 0, err  # config.json is a record for people: never parsed
    code, _, err = run(["export", str(run_copy), "--out", str(tmp_path / "exp")], capsys)
    assert code == 0, err
    assert not marker.exists()
    rec = json.loads((run_copy / "run.json").read_text())
    for bad, why in [(f"$__import__('pathlib').Path('{marker}').touch()", "expression"),
                     ("@network_def", "expression/reference"),
                     ({"_target_": "os.system", "command": f"touch {marker}"}, "not a medsim network"),
                     ({"_target_": "medsim.nn.os.system", "command": f"touch {marker}"}, "not a medsim network")]:
        doc = dict(rec, network=dict(rec["network"], backbone=bad) if isinstance(bad, str) else bad)
        (run_copy / "run.json").write_text(json.dumps(doc))
        for argv in (["evaluate", str(run_copy)], ["export", str(run_copy), "--out", str(tmp_path / "exp2")]):
            code, _, err = run(argv, capsys)
            assert code == 2 and "run.json" in err and why in err, (bad, err)
    assert not marker.exists()
    (run_copy / "run.json").write_text(json.dumps(dict(rec, network={**rec["network"], "_mode_": "callable"})))
    code, _, err = run(["evaluate", str(run_copy)], capsys)
    assert code == 2 and "'_mode_' is not allowed" in err


def test_cli_expressions_need_the_flag_and_are_never_saved(sample_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    expr = f"$__import__('pathlib').Path('{marker}').touch() or 2"
    out = tmp_path / "r"
    code, _, err = run(["train", "bundles/isic_dsl", "--output", str(out), *TINY_CLI, "-o", f"patience={expr}"],
                       capsys)
    assert code == 2 and "--allow-expressions" in err and not marker.exists() and not out.exists()
    code, _, err = run(["train", "bundles/isic_dsl", "--output", str(out), "-o", "dataset_dir=%/etc/hosts#x"], capsys)
    assert code == 2 and "--allow-expressions" in err
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(sample_root / "derm"), "--output", str(out),
                        *TINY_CLI, "--allow-expressions", "-o", f"patience={expr}"], capsys)
    assert code == 0, err
    assert marker.exists()  # the user asked for it
    for f in out.iterdir():
        if f.suffix == ".json":
            assert "__import__" not in f.read_text(), f
    assert json.loads((out / "config.json").read_text())["patience"] == 2
    assert json.loads((out / "run.json").read_text())["overrides"]["patience"] == 2


def test_a_refused_train_changes_nothing(run_copy, sample_root, tmp_path, capsys):
    before = snapshot(run_copy)
    other = tmp_path / "other"
    shutil.copytree(sample_root / "derm", other)
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(other), "--output", str(run_copy),
                        *TINY_CLI], capsys)
    assert code == 2 and "split made for other data" in err
    for bad in ("0", "-1", "abc"):
        code, _, err = run(["train", "bundles/isic_dsl", "--output", str(run_copy),
                            "-o", f"train#trainer#max_epochs={bad}"], capsys)
        assert code == 2 and "max_epochs" in err and "internal error" not in err, (bad, err)
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(sample_root / "derm"), "--output",
                        str(run_copy), *TINY_CLI, "-o", "embedding_dim=16"], capsys)
    assert code == 2 and "another network" in err and "embedding_dim" in err, err
    assert snapshot(run_copy) == before


def test_train_into_an_unusable_output_folder_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run(["train", "bundles/isic_dsl", "--output", str(blocker / "run"), *TINY_CLI], capsys)
    assert code == 2 and f"{blocker / 'run'}: cannot be the run folder" in err and "is a file" in err


def test_full_disk_leaves_no_temp_file_and_names_the_target(tmp_path, monkeypatch):
    from medsim.engines.handlers import atomic_torch_save
    from medsim.errors import atomic_write_text

    target = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.ones(2)}, target)
    good = target.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        atomic_torch_save({"a": torch.zeros(2)}, target)
    assert e.value.filename == str(target) and "No space left" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"] and target.read_bytes() == good
    monkeypatch.undo()
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full)
        with pytest.raises(OSError) as e:
            atomic_write_text(tmp_path / "x.json", "{}")
    assert e.value.filename == str(tmp_path / "x.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_full_disk_during_training_exits_2_naming_the_checkpoint(sample_root, tmp_path, capsys, monkeypatch):
    import medsim.engines.trainer as trainer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.torch, "save", full)
    out = tmp_path / "r"
    code, _, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(sample_root / "derm"), "--output", str(out),
                        *TINY_CLI], capsys)
    assert code == 2 and "last.pt: cannot write it (No space left on device)" in err, err
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_refused_export_and_index_build_change_nothing(run_copy, tmp_path, capsys):
    exp, idx = tmp_path / "exp", tmp_path / "idx"
    assert run(["export", str(run_copy), "--out", str(exp)], capsys)[0] == 0
    assert run(["index", "build", "--model", str(exp), "--data", str(run_copy / "split.json"), "--out", str(idx)],
               capsys)[0] == 0
    before_exp, before_idx = snapshot(exp), snapshot(idx)
    doctor(run_copy / "best.pt", tmp_path / "pwned")
    code, _, err = run(["export", str(run_copy), "--out", str(exp)], capsys)
    assert code == 2 and "refused" in err
    bad_image = tmp_path / "bad" / "x" / "broken.png"
    bad_image.parent.mkdir(parents=True)
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG cut inside its header
    code, _, err = run(["index", "build", "--model", str(exp), "--data", str(tmp_path / "bad"), "--out", str(idx)],
                       capsys)
    assert code == 2 and "broken.png" in err, err
    code, _, err = run(["index", "build", "--model", str(exp), "--data", str(run_copy / "split.json"), "--out",
                        str(idx), "--kind", "ivfpq"], capsys)
    assert code == 2 and "needs at least" in err
    assert snapshot(exp) == before_exp and snapshot(idx) == before_idx
    assert not [p for p in [*exp.rglob("*"), *idx.rglob("*")] if ".tmp" in p.name]


def test_checkpoints_carry_the_run_record_and_export_checks_it(run_copy, tmp_path, capsys):
    state = torch.load(run_copy / "best.pt", weights_only=True)
    record = json.loads((run_copy / "run.json").read_text())
    assert state["run_record"]["eval_preprocessing"] == record["eval_preprocessing"]  # the one preprocessing spec
    assert state["run_record"]["network"] == record["network"]
    other = dict(record, eval_preprocessing={**record["eval_preprocessing"], "spatial_size": [48, 48]})
    (run_copy / "run.json").write_text(json.dumps(other))
    code, _, err = run(["export", str(run_copy), "--out", str(tmp_path / "exp")], capsys)
    assert code == 2 and "trained with another eval_preprocessing" in err, err


def test_run_json_names_only_network_classes_and_transform_factories(run_copy, tmp_path, capsys):
    """A public or private helper function of medsim.data.transforms / medsim.nn is not a network or a factory:
    _load_images would hand a reader name to MONAI, which imports and calls it."""
    rec = json.loads((run_copy / "run.json").read_text())
    for target, extra in [("medsim.data.transforms._load_images", {"keys": ["image"], "reader": "os.getpid"}),
                          ("medsim.data.transforms.make_transforms", {"kind": "rgb2d"}),
                          ("medsim.nn.tiling.tile_predictions", {}),
                          ("medsim.nn.Embedder\n", {})]:
        (run_copy / "run.json").write_text(json.dumps(dict(rec, eval_preprocessing={"_target_": target, **extra})))
        code, _, err = run(["evaluate", str(run_copy)], capsys)
        assert code == 2 and "run.json" in err and ("not a medsim network" in err or "private name" in err), err
    (run_copy / "last.pt").write_bytes((run_copy / "best.pt").read_bytes())
    state = torch.load(run_copy / "last.pt", weights_only=True)
    del state["engine"]
    torch.save(state, run_copy / "last.pt")
    (run_copy / "run.json").write_text(json.dumps(rec))
    from medsim.engines.handlers import Checkpointer
    from medsim.errors import MedsimError
    from types import SimpleNamespace

    with pytest.raises(MedsimError, match=r"last\.pt: cannot resume from this checkpoint \(KeyError"):
        Checkpointer(run_copy, {}).load(SimpleNamespace(state=SimpleNamespace(epoch=0, iteration=0)))
