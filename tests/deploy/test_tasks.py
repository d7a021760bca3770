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
    from medsim.data.splits import load_split

    doc = load_split(split)
    train = [it["image"] for it in doc["training"]]
    test = [it["image"] for it in doc["test"]]
    train_ids = [it["id"] for it in doc["training"]]
    assert f"indexed {len(train)} cases" in out
    stored = (idx / "case_index.json").read_text()  # tokens, labels, hashed groups: no file or folder name
    assert all(Path(t).name not in stored and Path(t).stem not in stored for t in train)
    assert str(Path(train[0]).parent) not in stored
    assert json.loads((idx / "cases.local.json").read_text())["cases"] == dict(zip(train_ids, train))

    # PyTorch reference: test queries against the training gallery, exact cosine top-5
    from medsim.export.run import preprocess_items

    net = loaded.network.eval()
    with torch.no_grad():
        g = net(torch.as_tensor(preprocess_items(train, loaded.transform)))["embedding"].numpy()
        q = net(torch.as_tensor(preprocess_items(test, loaded.transform)))["embedding"].numpy()
    ref = np.argsort(-(q @ g.T), axis=1)[:, :5]

    from medsim.deploy.tasks import search_images

    hits = search_images(idx, test, k=5, html=tmp_path / "search.html")
    got = np.array([[train_ids.index(h.record["id"]) for h in row] for row in hits])
    assert (got == ref).all(axis=1).mean() >= 0.99  # top-5 identical for >= 99 % of queries
    page = (tmp_path / "search.html").read_text()
    assert page.count("<img") == len(test) * 6

    code, out, err = run(["search", "--index", str(idx), test[0], "--k", "3"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("query 1 (c-") and len(out.splitlines()) == 5
    assert Path(test[0]).stem not in out and all(h in out for h in train_ids[:0])


def test_search_refuses_an_index_of_another_model(model_dir, tiny_run, tmp_path, capsys):
    from medsim.deploy.tasks import build_index

    idx = tmp_path / "index"
    build_index(model_dir, tiny_run / "split.json", idx, progress=False)
    meta = json.loads((idx / "case_index.json").read_text())
    meta["model_id"] = "Embedder:0000000000000000"
    (idx / "case_index.json").write_text(json.dumps(meta))
    image = next(iter(json.loads((idx / "cases.local.json").read_text())["cases"].values()))
    code, _, err = run(["search", "--index", str(idx), image], capsys)
    assert code == 2 and "rebuild the index" in err


def test_localize_cli_writes_overlays_and_a_dice_table(model_dir, sample_root, tmp_path, capsys):
    images = sorted((sample_root / "derm" / "images").glob("*.png"))[:4]
    out = tmp_path / "loc"
    code, text, err = run(["localize", "--model", str(model_dir), *map(str, images), "--out", str(out),
                           "--masks", str(sample_root / "derm" / "masks")], capsys)
    assert code == 0, err
    assert "Dice" in text
    names = json.loads((out / "cases.local.json").read_text())["cases"]  # token -> input, on this machine only
    assert sorted(names.values()) == sorted(map(str, images))
    for name in names:
        assert (out / f"{name}_overlay.png").is_file() and (out / f"{name}_mask.png").is_file()
        assert isinstance(json.loads((out / f"{name}_boxes.json").read_text()), (list, dict))
        assert f"{name}_*" in text
    assert not any(img.stem in f.name for img in images for f in out.iterdir())  # no file name in output names
    assert not any(img.stem in text for img in images)
    table = json.loads((out / "localization.json").read_text())
    assert not any(img.stem in json.dumps(table) for img in images)
    assert table["summary"]["images"] == 4 and 0.0 <= table["summary"]["dice"] <= 1.0
    assert (out / "localization.md").read_text().startswith("| images scored | Dice |")


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


def test_search_from_a_split_reports_recall_and_draws_a_png(model_dir, tiny_run, loaded, tmp_path, capsys):
    from PIL import Image

    from medsim.export.run import split_images

    idx = tmp_path / "index"
    code, _, err = run(["index", "build", "--model", str(model_dir), "--data", str(tiny_run / "split.json"),
                        "--out", str(idx)], capsys)
    assert code == 0, err
    assert not (idx / "model_dir.txt").exists()  # the export folder is recorded inside case_index.json
    meta = json.loads((idx / "case_index.json").read_text())
    assert meta["info"]["model_dir"] == str(model_dir.resolve())
    png = tmp_path / "grid.png"
    code, out, err = run(["search", "--index", str(idx / "case_index.json"), "--data", str(tiny_run / "split.json"),
                          "--split", "test", "--k", "3", "--html", str(png)], capsys)
    assert code == 0, err
    r1 = float(out.split("R@1 ")[1].split()[0])
    # the same number from PyTorch: test queries against the training gallery
    import torch

    net = loaded.network.eval()
    g, gl, _ = split_images(loaded, "training", fallback=False)
    q, ql, _ = split_images(loaded, "test", fallback=False)
    with torch.no_grad():
        ge, qe = net(torch.as_tensor(g))["embedding"].numpy(), net(torch.as_tensor(q))["embedding"].numpy()
    top1 = np.argmax(qe @ ge.T, axis=1)
    assert r1 == pytest.approx(float(np.mean(gl[top1] == ql)), abs=1e-4)
    with Image.open(png) as im:
        n_test = len(json.loads((tiny_run / "split.json").read_text())["test"])
        assert im.size == (4 * 136, n_test * 164)  # (1 query + 3 hits) x 136 px, a row of 164 px per query
        frame = np.asarray(im.convert("RGB"))[1, 136 + 1]  # top-left frame pixel of the first hit
    assert tuple(frame) in ((34, 170, 34), (204, 51, 51))  # green: same label, red: different


@pytest.mark.parametrize("args, msg", [
    (["search", "--index", "{idx}", "{img}", "--k", "0"], "Invalid value for '--k'"),
    (["search", "--index", "{idx}", "{img}", "--html", "/proc/none/x.html"], "error: "),
    (["search", "--index", "{idx}"], "give query IMAGEs or --data"),
    (["localize", "--model", "{model}", "{img}", "--out", "{tmp}/o", "--threshold", "abc"],
     "'otsu' or a number in [0, 1], got 'abc'"),
    (["localize", "--model", "{model}", "{img}", "--out", "{tmp}/afile"], "is a file"),
    (["localize", "--model", "{model}", "{img}", "--out", "{tmp}/o", "--mask-file", "{tmp}/bad.png"],
     "bad.png: ground-truth mask for"),
    (["index", "build", "--model", "{model}", "--data", "{split}", "--out", "{tmp}/ix", "--kind", "ivfpq"],
     "needs at least 256"),
    (["index", "build", "--model", "{model}", "--data", "{tmp}/list.json", "--out", "{tmp}/ix"],
     "a split JSON is an object"),
    (["index", "build", "--model", "{model}", "--data", "{tmp}/noimage.json", "--out", "{tmp}/ix"],
     "row 1"),
    (["index", "build", "--model", "{tmp}/afile", "--data", "{split}", "--out", "{tmp}/ix"], "Invalid value"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tiny_run, sample_root, tmp_path, capsys, args, msg):
    from medsim.deploy.tasks import build_index

    idx = tmp_path / "index"
    build_index(model_dir, tiny_run / "split.json", idx, progress=False)
    img = sorted((sample_root / "derm" / "images").glob("*.png"))[0]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "noimage.json").write_text(json.dumps({"training": [{"image": "a.png"}, {"label": 1}]}))
    fill = {"idx": idx, "img": img, "model": model_dir, "tmp": tmp_path, "split": tiny_run / "split.json"}
    code, _, err = run([a.format(**fill) for a in args], capsys)
    assert code == 2 and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "ix").exists()


def test_localize_reads_0_1_masks_and_skips_empty_ones(model_dir, sample_root, tmp_path, capsys):
    from PIL import Image

    images = sorted((sample_root / "derm" / "images").glob("*.png"))[:3]
    gts = sorted((sample_root / "derm" / "masks").glob("*.png"))
    masks = []
    for i, img in enumerate(images):
        gt = next(g for g in gts if g.stem.startswith(img.stem))
        m = (np.asarray(Image.open(gt).convert("L")) > 127).astype(np.uint8)  # 0/1 label mask
        if i == 2:
            m[:] = 0
        masks.append(tmp_path / f"m{i}.png")
        Image.fromarray(m).save(masks[-1])
    args = ["localize", "--model", str(model_dir), *map(str, images), "--out", str(tmp_path / "loc")]
    code, text, err = run(args + [a for m in masks for a in ("--mask-file", str(m))], capsys)
    assert code == 0, err
    assert "(2 with masks)" in text and "1 image(s) have an empty ground-truth mask" in text
    ref = json.loads((tmp_path / "loc" / "localization.json").read_text())
    code, _, _ = run(["localize", "--model", str(model_dir), *map(str, images[:2]), "--out", str(tmp_path / "l255"),
                      "--masks", str(sample_root / "derm" / "masks")], capsys)
    same = json.loads((tmp_path / "l255" / "localization.json").read_text())
    assert same["summary"]["dice"] == pytest.approx(ref["summary"]["dice"])  # 0/1 and 0/255 masks agree


def test_int8_model_through_index_search_and_localize(model_dir, tiny_run, sample_root, tmp_path, capsys):
    import shutil

    from medsim.deploy.engine import EmbeddingEngine
    from medsim.export.manifest import update_manifest
    from medsim.export.quantize import quantize_onnx

    d = tmp_path / "export"
    shutil.copytree(model_dir, d)
    img = sorted((sample_root / "derm" / "images").glob("*.png"))[0]
    code, _, err = run(["localize", "--model", str(d), str(img), "--out", str(tmp_path / "l"), "--precision", "int8"],
                       capsys)
    assert code == 2 and "no INT8 model" in err and "--quantize static" in err
    quantize_onnx(d / "model.onnx", d / "model.int8.onnx", mode="dynamic")
    update_manifest(d, int8={"model": "model.int8.onnx", "mode": "dynamic"})
    idx = tmp_path / "ix"
    code, _, err = run(["index", "build", "--model", str(d), "--data", str(tiny_run / "split.json"), "--out", str(idx),
                        "--precision", "int8"], capsys)
    assert code == 0, err
    from medsim.deploy.index import CaseIndex

    index = CaseIndex.load(idx)
    assert index.info["precision"] == "int8"
    with EmbeddingEngine(d, backend="ort-cpu", model="model.int8.onnx") as e8, \
            EmbeddingEngine(d, backend="ort-cpu") as e32:
        q8, q32 = e8.embed([img])["embedding"], e32.embed([img])["embedding"]
    assert np.abs(q8 - q32).max() > 1e-6  # really another model
    from medsim.deploy.tasks import search_images

    hits = search_images(idx, [img], k=3)  # queries embedded with the index's precision (int8)
    ref = index.search(q8, 3)
    assert [h.id for h in hits[0]] == [h.id for h in ref[0]]
    assert [h.score for h in hits[0]] == pytest.approx([h.score for h in ref[0]], abs=1e-6)
    code, _, err = run(["localize", "--model", str(d), str(img), "--out", str(tmp_path / "l"), "--precision", "int8"],
                       capsys)
    assert code == 0, err


def test_search_png_caps_its_rows(sample_root, tmp_path):
    from PIL import Image

    from medsim.viz.search_report import Case, search_png

    imgs = [str(p) for p in sorted((sample_root / "derm" / "images").glob("*.png"))[:3]]
    q = [Case(i, "a") for i in imgs]
    hits = [[Case(imgs[0], "a", 0.9), Case("/nonexistent.png", "b", 0.5)] for _ in imgs]
    with Image.open(search_png(q, hits, tmp_path / "g.png", max_rows=2)) as im:
        assert im.size == (3 * 136, 2 * 164 + 20)
        px = np.asarray(im.convert("RGB"))
    assert tuple(px[1, 136 + 1]) == (34, 170, 34) and tuple(px[1, 2 * 136 + 1]) == (204, 51, 51)


def test_recall_from_hits_against_its_definition():
    from types import SimpleNamespace

    from medsim.deploy.tasks import recall_from_hits

    def row(*labels):
        return [SimpleNamespace(record={"label": lab}) for lab in labels]

    hits = [row("a", "b", "c"), row("b", "b", "a"), row("c", "c", "c"), row("a", "a", "a")]
    r = recall_from_hits(["a", "a", "a", None], hits, [1, 2, 3])
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(1 / 3), "R@3": pytest.approx(2 / 3)}
    assert recall_from_hits([None, None], hits[:2], [1]) == {}
