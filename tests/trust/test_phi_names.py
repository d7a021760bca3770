"""Trust: patient identifiers in file names and id columns never reach a split, a run folder, an export, an index,
an output file name or printed output in clear (issue 9, part 3). Cases travel as opaque tokens; the readable paths
stay in the *.local.json files beside a split, an index or a localize folder, on the machine that reads the images.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsim.cli import main

#: what must never appear outside a *.local.json file
SECRETS = ("Doe", "Jane", "19700101", "MRN4471", "Smith")


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def leaks(folder: Path) -> list[str]:
    """Files under ``folder`` (other than *.local.json) whose name or text holds a secret."""
    bad = []
    for p in folder.rglob("*"):
        if any(s in p.name for s in SECRETS):
            bad.append(f"name {p}")
        if p.is_file() and not p.name.endswith(".local.json") and p.suffix in (".json", ".md", ".html", ".txt",
                                                                                ".jsonl", ".pbtxt"):
            text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", p.read_text(encoding="utf-8", errors="replace"))
            bad += [f"{p}: {s}" for s in SECRETS if s in text]
    return bad


@pytest.fixture(scope="module")
def named_data(sample_root, tmp_path_factory) -> Path:
    """The sample's dermoscopy images as a class-folder dataset whose file names are patient names and MRNs."""
    root = tmp_path_factory.mktemp("named") / "derm"
    src = sorted((sample_root / "derm" / "images").glob("*.png"))
    labels = json.loads(json.dumps([p.name for p in src]))
    meta = (sample_root / "derm" / "HAM10000_metadata.csv").read_text().splitlines()
    dx = {ln.split(",")[1]: ln.split(",")[2] for ln in meta[1:]}
    for i, p in enumerate(src):
        cls = dx.get(p.stem, "x")
        name = [f"Doe^Jane 19700101 {i}.png", f"MRN4471{i:03d}.png", f"Smith, John {i}.png"][i % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / cls / name)
    assert labels
    return root


def test_split_train_export_index_search_localize_keep_names_out(named_data, tmp_path, capsys):
    code, out, err = run(["data", "split", str(named_data), "--by", "image", "--out", str(tmp_path / "s.json")],
                         capsys)
    assert code == 0, err
    split = json.loads((tmp_path / "s.json").read_text())
    assert all(it["id"].startswith("c-") and "image" not in it for k in ("training", "test") for it in split[k])
    assert not leaks(tmp_path) and not any(s in out + err for s in SECRETS)
    assert any(s in (tmp_path / "s.local.json").read_text() for s in SECRETS)  # the paths are kept locally

    run_dir = tmp_path / "run"
    code, out, err = run(["train", "bundles/isic_dsl", "--dataset-dir", str(named_data), "--output", str(run_dir),
                          "-o", "max_epochs=1", "-o", "image_size=32", "-o", "backbone=resnet10",
                          "-o", "widen_factor=0.25", "-o", "embedding_dim=32", "-o", "batch_size=16",
                          "-o", "train#output_handlers#0#_disabled_=true", "-o", "train#output_handlers#1#_disabled_=true"],
                         capsys)
    assert code == 0, err
    assert not leaks(run_dir) and not any(s in out + err for s in SECRETS), leaks(run_dir)

    exp = tmp_path / "export"
    code, out, err = run(["export", str(run_dir), "--out", str(exp)], capsys)
    assert code == 0, err
    assert not leaks(exp) and not any(s in out + err for s in SECRETS)

    idx = tmp_path / "index"
    code, out, err = run(["index", "build", "--model", str(exp), "--data", str(run_dir / "split.json"),
                          "--out", str(idx)], capsys)
    assert code == 0, err
    meta = json.loads((idx / "case_index.json").read_text())
    assert all(set(r) <= {"id", "label", "split", "group", "patient", "study"} for r in meta["records"])
    assert not leaks(idx) and not any(s in out for s in SECRETS)
    local = json.loads((idx / "cases.local.json").read_text())["cases"]
    assert set(local) == {r["id"] for r in meta["records"]} and any(s in v for v in local.values() for s in SECRETS)

    code, out, err = run(["index", "build", "--model", str(exp), "--data", str(named_data), "--out",
                          str(tmp_path / "shared_index"), "--shareable"], capsys)
    assert code == 0, err  # a dataset folder, like train takes; nothing local written
    assert not (tmp_path / "shared_index" / "cases.local.json").exists() and not leaks(tmp_path / "shared_index")

    html = tmp_path / "pages" / "search.html"
    code, out, err = run(["search", "--index", str(idx), "--data", str(run_dir / "split.json"), "--split", "test",
                          "--k", "3", "--html", str(html)], capsys)
    assert code == 0, err
    assert "query 1 (c-" in out and not any(s in out for s in SECRETS) and not leaks(html.parent)
    assert html.read_text().count("<img") > 0  # the pictures come from cases.local.json on this machine

    images = sorted(named_data.rglob("*.png"))[:3]
    loc = tmp_path / "loc"
    code, out, err = run(["localize", "--model", str(exp), *map(str, images), "--out", str(loc)], capsys)
    assert code == 0, err
    assert not leaks(loc) and not any(s in out for s in SECRETS) and len(list(loc.glob("c-*_overlay.png"))) == 3
    code, out, err = run(["localize", "--model", str(exp), *map(str, images), "--out", str(tmp_path / "loc2"),
                          "--shareable"], capsys)
    assert code == 0 and not (tmp_path / "loc2" / "cases.local.json").exists()


def test_an_id_column_of_mrns_never_reaches_the_split_or_index(sample_root, tmp_path, capsys):
    rows = ["image,label,id"]
    for i, p in enumerate(sorted((sample_root / "derm" / "images").glob("*.png"))[:24]):
        rows.append(f"{p},{'a' if i % 2 else 'b'},MRN4471{i:03d}")
    table = tmp_path / "list.csv"
    table.write_text("\n".join(rows) + "\n")
    code, out, err = run(["data", "split", str(table), "--by", "image", "--out", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    assert "MRN4471" not in (tmp_path / "s.json").read_text() and "MRN4471" not in out + err

    from medsim.data.phi import project_anonymizer
    from medsim.deploy.tasks import read_cases

    cases = read_cases(table)  # index build takes a CSV datalist too
    assert sorted(c["id"] for c in cases) == sorted(project_anonymizer().case_token(f"MRN4471{i:03d}")
                                                    for i in range(24))


def test_a_case_index_refuses_a_clear_case_id():
    from medsim.deploy.index import CaseIndex

    index = CaseIndex(4, model_id="m")
    with pytest.raises(ValueError, match="'id' must be a hashed token"):
        index.add(np.eye(4, dtype=np.float32)[:1], [{"id": "Doe^Jane 19700101"}])


def test_a_split_without_its_local_file_says_where_the_paths_are(named_data, tmp_path, capsys):
    code, _, err = run(["data", "split", str(named_data), "--by", "image", "--out", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    shared = tmp_path / "elsewhere"
    shared.mkdir()
    shutil.copy(tmp_path / "s.json", shared / "s.json")  # handed to another site without s.local.json
    from medsim.data.splits import load_split
    from medsim.errors import DataError

    with pytest.raises(DataError, match=r"s\.local\.json on the machine that made the split"):
        load_split(shared / "s.json")
    assert load_split(shared / "s.json", require_paths=False)["training"][0]["id"].startswith("c-")


def test_search_exclude_self_is_leave_one_out(named_data, tmp_path, capsys, tiny_run):
    exp = tmp_path / "export"
    assert run(["export", str(tiny_run), "--out", str(exp)], capsys)[0] == 0
    idx = tmp_path / "index"
    assert run(["index", "build", "--model", str(exp), "--data", str(tiny_run / "split.json"), "--split", "test",
                "--out", str(idx)], capsys)[0] == 0
    from medsim.deploy.tasks import read_cases, search_images

    cases = read_cases(tiny_run / "split.json", split="test")
    images, ids = [c["uri"] for c in cases], [c["id"] for c in cases]
    plain = search_images(idx, images, k=3, query_ids=ids)
    assert all(row[0].record["id"] == q for row, q in zip(plain, ids))  # each query finds itself first
    loo = search_images(idx, images, k=3, query_ids=ids, exclude_self=True)
    assert all(len(row) == 3 and q not in [h.record["id"] for h in row] for row, q in zip(loo, ids))
    assert [[h.id for h in row] for row in loo] == [[h.id for h in row if h.record["id"] != q][:3] for row, q in
                                                    zip(search_images(idx, images, k=4, query_ids=ids), ids)]
    code, out, _ = run(["search", "--index", str(idx), "--data", str(tiny_run / "split.json"), "--split", "test",
                        "--exclude-self"], capsys)
    assert code == 0 and "leave-one-out" in out and "gallery = the index" in out
    code, out, _ = run(["search", "--index", str(idx), "--data", str(tiny_run / "split.json"), "--split", "test"],
                       capsys)
    assert code == 0 and "R@1 1.0000" in out and "own hit" in out
