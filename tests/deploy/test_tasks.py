"""index build → search → localize through the CLI, on the tiny exported run (torch-free runtime underneath)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsim.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def model_dir(exported) -> Path:
    return Path(exported["onnx_path"]).parent


def test_index_search_equals_pytorch_retrieval(model_dir, tiny_run, loaded, tmp_path, capsys):
    import torch

    split = tiny_run / "split.json"
    idx = tmp_path / "index"
    code, out, err = run(["index", "build", "--model", str(model_dir), "--data", str(split), "--out", str(idx)], capsys)
    assert code == 0, err
    doc = json.loads(split.read_text())
    root = Path(doc["meta"]["dataset_dir"])
    train = [str(root / it["image"]) for it in doc["training"]]
    test = [str(root / it["image"]) for it in doc["test"]]
    assert f"indexed {len(train)} cases" in out

    # PyTorch reference: test queries against the training gallery, exact cosine top-5
    from medsim.export.run import preprocess_items

    net = loaded.network.eval()
    with torch.no_grad():
        g = net(torch.as_tensor(preprocess_items(train, loaded.transform)))["embedding"].numpy()
        q = net(torch.as_tensor(preprocess_items(test, loaded.transform)))["embedding"].numpy()
    ref = np.argsort(-(q @ g.T), axis=1)[:, :5]

    from medsim.deploy.tasks import search_images

    hits = search_images(idx, test, k=5, html=tmp_path / "search.html")
    got = np.array([[train.index(h.record["uri"]) for h in row] for row in hits])
    assert (got == ref).all(axis=1).mean() >= 0.99  # top-5 identical for >= 99 % of queries
    page = (tmp_path / "search.html").read_text()
    assert page.count("<img") == len(test) * 6

    code, out, err = run(["search", "--index", str(idx), test[0], "--k", "3"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == test[0] and len(out.splitlines()) == 5


def test_search_refuses_an_index_of_another_model(model_dir, tiny_run, tmp_path, capsys):
    from medsim.deploy.tasks import build_index

    idx = tmp_path / "index"
    build_index(model_dir, tiny_run / "split.json", idx, progress=False)
    meta = json.loads((idx / "case_index.json").read_text())
    meta["model_id"] = "Embedder:0000000000000000"
    (idx / "case_index.json").write_text(json.dumps(meta))
    code, _, err = run(["search", "--index", str(idx), str(sorted(Path(meta["records"][0]["uri"]).parent.glob("*.png"))[0])],
                       capsys)
    assert code == 2 and "rebuild the index" in err


def test_localize_cli_writes_overlays_and_a_dice_table(model_dir, sample_root, tmp_path, capsys):
    images = sorted((sample_root / "derm" / "images").glob("*.png"))[:4]
    out = tmp_path / "loc"
    code, text, err = run(["localize", "--model", str(model_dir), *map(str, images), "--out", str(out),
                           "--masks", str(sample_root / "derm" / "masks")], capsys)
    assert code == 0, err
    assert "Dice" in text
    for img in images:
        assert (out / f"{img.stem}_overlay.png").is_file() and (out / f"{img.stem}_mask.png").is_file()
        assert isinstance(json.loads((out / f"{img.stem}_boxes.json").read_text()), (list, dict))
    table = json.loads((out / "localization.json").read_text())
    assert table["summary"]["images"] == 4 and 0.0 <= table["summary"]["dice"] <= 1.0
    assert (out / "localization.md").read_text().startswith("| images | Dice |")


def test_read_cases_takes_series_and_volumes(tmp_path):
    from medsim.deploy import DeployError
    from medsim.deploy.tasks import read_cases

    doc = {"meta": {"dataset_dir": str(tmp_path)},
           "training": [{"image": ["s1/a.dcm", "s1/b.dcm"], "label_name": "liver", "patient": "p-1"},
                        {"image": "v.nii.gz", "label_name": "kidney"}],
           "test": [{"image": ["s1/a.dcm", "s2/b.dcm"]}]}
    (tmp_path / "split.json").write_text(json.dumps(doc))
    cases = read_cases(tmp_path / "split.json")
    assert [c["uri"] for c in cases] == [str(tmp_path / "s1"), str(tmp_path / "v.nii.gz")]
    assert cases[0]["patient"] == "p-1" and cases[1]["label"] == "kidney"
    with pytest.raises(DeployError, match="spans 2 folders"):
        read_cases(tmp_path / "split.json", split="test")
    (tmp_path / "vols").mkdir()
    (tmp_path / "vols" / "a.nii.gz").write_bytes(b"")
    assert [c["uri"] for c in read_cases(tmp_path / "vols")] == [str(tmp_path / "vols" / "a.nii.gz")]


def test_index_build_refine_applies_to_ivfpq_only(model_dir, tiny_run, tmp_path, capsys):
    code, out, err = run(["index", "build", "--model", str(model_dir), "--data", str(tiny_run / "split.json"),
                          "--out", str(tmp_path / "ix"), "--kind", "hnsw", "--refine", "4"], capsys)
    assert code == 2 and "refine=4 applies to kind='ivfpq' only" in err and "Traceback" not in err
    assert not (tmp_path / "ix").exists()
