"""The MONAI Label app against a real ``monailabel start_server`` on a loopback port (issue 13).

A tiny model is trained on real HAM10000 images, exported and indexed; the server runs in its own environment
(``bash deploy/monailabel/install.sh``: ``deploy/monailabel/.venv`` or ``MEDSIM_LABEL_VENV``) with a studies folder
of other real images. Over HTTP: the task list, similar cases and localization equal to ``medsim search`` /
``medsim localize``, an upload, active learning equal to the ranking computed here, concurrent clients, malformed
requests (4xx, the server keeps serving), and saving a label then fine-tuning through ``/train/``.
Skipped only when the MONAI Label environment is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "deploy" / "monailabel"
VENV = Path(os.environ.get("MEDSIM_LABEL_VENV", APP / ".venv"))
CLASSES = ("nv", "mel", "bkl", "bcc")
TINY = {"max_epochs": 1, "image_size": 32, "backbone": "resnet10", "widen_factor": 0.25, "embedding_dim": 32,
        "batch_size": 16, "eval_batch_size": 32, "min_neurons": 4,
        "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}

pytestmark = [pytest.mark.slow]

if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))


def _ham_rows(ham: Path, per_class: int) -> list[dict[str, str]]:
    """``per_class`` images of each class of CLASSES, one per lesion, in metadata order."""
    rows, seen = [], set()
    counts = dict.fromkeys(CLASSES, 0)
    with (ham / "HAM10000_metadata.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["dx"] in counts and counts[r["dx"]] < per_class and r["lesion_id"] not in seen:
                seen.add(r["lesion_id"])
                counts[r["dx"]] += 1
                rows.append({"image": str(ham / "images" / f"{r['image_id']}.jpg"), "label": r["dx"],
                             "image_id": r["image_id"]})
    return rows


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    if not (VENV / "bin" / "monailabel").exists():  # install.sh's last step; it checks the import too
        pytest.skip(f"no MONAI Label environment at {VENV}: `bash deploy/monailabel/install.sh` was not run or failed")
    from medsim.deploy.tasks import build_index
    from medsim.engines.workflow import train_bundle
    from medsim.export.pipeline import export_run

    ham = shared_data / "ham10000"
    tmp = tmp_path_factory.mktemp("monailabel")
    rows = _ham_rows(ham, 16)
    model_rows, study_rows = [], []
    for cls in CLASSES:  # per class: 12 to train/index, 4 into the studies folder (never indexed)
        of = [r for r in rows if r["label"] == cls]
        model_rows += of[:12]
        study_rows += of[12:]
    datalist = tmp / "datalist.csv"
    with datalist.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["image", "label"])
        w.writeheader()
        w.writerows({"image": r["image"], "label": r["label"]} for r in model_rows)
    run = tmp / "run"
    train_bundle(ROOT / "bundles" / "isic_dsl", dataset_dir=str(datalist), output_dir=str(run), overrides=dict(TINY))
    export = tmp / "export"
    export_run(run, export, opt_batch=2)
    index = tmp / "index"
    build_index(export, run / "split.json", index, progress=False)
    studies = tmp / "studies"
    studies.mkdir()
    for r in study_rows:
        shutil.copy(r["image"], studies / Path(r["image"]).name)
    return {"export": export, "index": index, "run": run, "studies": studies, "work": tmp / "work", "tmp": tmp,
            "study_rows": study_rows}


@pytest.fixture(scope="module")
def server(setup):
    from client import serve

    conf = {"export": setup["export"], "index": setup["index"], "run": setup["run"], "work": setup["work"]}
    with serve(setup["studies"], conf, venv=VENV, log=setup["tmp"] / "server.log",
               env={"MEDSIM_SALT": os.environ.get("MEDSIM_SALT", "test-salt"), "MEDSIM_THREADS": "1"}) as c:
        yield c


def _ids(setup) -> list[str]:
    return sorted(Path(r["image"]).stem for r in setup["study_rows"])


def _path(setup, image_id: str) -> Path:
    return setup["studies"] / f"{image_id}.jpg"


def test_info_lists_the_tasks(server):
    info = server.info()
    assert {"similar_cases", "localize"} <= set(info["models"])
    assert info["models"]["localize"]["labels"] == {"lesion": 1}
    assert {"medsim", "medsim_diversity", "medsim_uncertainty", "medsim_hybrid"} <= set(info["strategies"])
    assert "medsim" in info["trainers"]
    assert "classify" not in info["models"]  # a metric-learning export has no logits


def test_similar_cases_equal_medsim_search(server, setup, capsys):
    from medsim.cli import main
    from medsim.deploy.tasks import search_images

    ids = _ids(setup)
    paths = [_path(setup, i) for i in ids]
    ref = search_images(setup["index"], paths, k=5)
    for image_id, row in zip(ids, ref):
        got = server.similar_cases(image_id, k=5)
        assert [c["id"] for c in got["cases"]] == [h.record["id"] for h in row]
        np.testing.assert_allclose([c["score"] for c in got["cases"]], [h.score for h in row], atol=1e-5)
        assert [c["label"] for c in got["cases"]] == [h.record["label"] for h in row]
        assert all(c["thumbnail"].startswith("data:image/png;base64,") for c in got["cases"])
        assert image_id not in json.dumps(got)  # the query is named by its case token, never its file name
    # and the CLI's own printout for the first image: same case tokens and scores (4 decimals)
    with pytest.raises(SystemExit) as e:
        main(["search", "--index", str(setup["index"]), str(paths[0]), "--k", "5"])
    assert e.value.code == 0
    printed = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    got = server.similar_cases(ids[0], k=5)["cases"]
    assert [p[-1] for p in printed] == [c["id"] for c in got]
    assert [p[1] for p in printed] == [f"{c['score']:.4f}" for c in got]


def test_upload_gives_the_same_answer_as_the_image_id(server, setup):
    image_id = _ids(setup)[0]
    by_id = server.similar_cases(image_id, k=3)
    by_upload = server.similar_cases(None, k=3, upload=_path(setup, image_id))
    assert [c["id"] for c in by_upload["cases"]] == [c["id"] for c in by_id["cases"]]
    np.testing.assert_allclose([c["score"] for c in by_upload["cases"]], [c["score"] for c in by_id["cases"]],
                               atol=1e-6)


def test_localize_equals_medsim_localize(server, setup, tmp_path):
    from PIL import Image

    from medsim.deploy.tasks import localize_images

    for image_id in _ids(setup)[:4]:
        params, label_png = server.localize(image_id)
        label = np.asarray(Image.open(io.BytesIO(label_png)))
        res = localize_images(setup["export"], [_path(setup, image_id)], tmp_path / image_id, progress=False)
        name = res["names"][0]
        mask = np.asarray(Image.open(tmp_path / image_id / f"{name}_mask.png")) > 0
        with Image.open(_path(setup, image_id)) as im:
            assert label.shape == (im.height, im.width)
        assert set(np.unique(label)) <= {0, 1}
        np.testing.assert_array_equal(label == 1, mask)
        boxes = json.loads((tmp_path / image_id / f"{name}_boxes.json").read_text())["boxes"]
        assert params["boxes"] == boxes and params["name"] == name


def test_active_learning_returns_the_ranked_unlabelled_image(server, setup):
    from medsim.deploy.assist import Assistant

    ids = _ids(setup)
    a = Assistant(setup["export"], setup["index"])
    try:
        for strategy in ("diversity", "uncertainty", "hybrid"):
            ranked = a.rank_unlabelled([_path(setup, i) for i in ids], [], strategy=strategy, n=1)
            got = server.next_sample(f"medsim_{strategy}")
            assert got["id"] == ids[ranked[0]["index"]], strategy
            assert got["id"] in ids
            assert got["score"] == pytest.approx(ranked[0]["score"], rel=1e-4, abs=1e-6)
    finally:
        a.close()


def test_concurrent_clients_get_correct_answers(server, setup, capsys):
    """8 clients × 20 requests, similar cases of random study images: every answer equals the serial one. The
    latencies it saw are printed into the test log (`benchmarks/monailabel_latency.py` measures them properly)."""
    ids = _ids(setup)
    expected = {i: [c["id"] for c in server.similar_cases(i, k=5)["cases"]] for i in ids}
    from client import concurrent_similar_cases

    run = concurrent_similar_cases(server.url, ids, expected, clients=8, requests=20)
    errors, ms, wall = run["errors"], run["latencies_ms"], run["wall_s"]
    assert len(ms) == 160
    assert not errors, errors[:5]
    with capsys.disabled():
        print(f"\n[monailabel server] 8 clients x 20 similar_cases (tiny 32 px model, {len(ids)} study images): "
              f"median {np.median(ms):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, {len(ms) / wall:.0f} requests/s")


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, setup, tmp_path):
    from client import LabelError

    cases = []
    with pytest.raises(LabelError) as e:
        server.similar_cases("no_such_image")
    cases.append(e.value)
    assert e.value.status == 404 and "no_such_image" in e.value.detail
    with pytest.raises(LabelError) as e:
        server.infer("segment_everything", _ids(setup)[0])
    assert e.value.status == 404 and "similar_cases" in e.value.detail
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    with pytest.raises(LabelError) as e:
        server.similar_cases(None, upload=broken)
    assert e.value.status == 422 and e.value.detail
    with pytest.raises(LabelError) as e:
        server.next_sample("no_such_strategy")
    assert e.value.status == 404
    with pytest.raises(LabelError) as e:
        server.similar_cases(_ids(setup)[0], k=0)
    assert e.value.status == 422 and "k must be" in e.value.detail
    assert server.similar_cases(_ids(setup)[0], k=2)["cases"]  # still serving


def test_save_label_then_train_switches_to_a_fine_tuned_model(server, setup, tmp_path, capsys):
    """An annotator saves a corrected mask with its class; /train/medsim fine-tunes on the index's cases plus
    that label, exports, re-indexes, and the server answers with the new model (the labelled image is now a case
    of the index, with the class the annotator gave)."""
    from PIL import Image

    image_id = _ids(setup)[0]
    before = server.similar_cases(image_id, k=3)
    params, label_png = server.localize(image_id)
    label = tmp_path / f"{image_id}.png"
    label.write_bytes(label_png)
    cls = next(r["label"] for r in setup["study_rows"] if Path(r["image"]).stem == image_id)
    server.save_label(image_id, label, {"class": cls})
    assert image_id not in server.next_sample("medsim_diversity")["id"] or len(_ids(setup)) == 1

    import time

    t0 = time.perf_counter()
    server.train("medsim", max_epochs=1, overrides={"min_neurons": 4})
    status = server.wait_train(timeout=900)
    assert status["status"] == "DONE", status
    with capsys.disabled():
        print(f"\n[monailabel server] /train/medsim (1 epoch, fine-tune + export + re-index): "
              f"{time.perf_counter() - t0:.1f} s")
    current = json.loads((setup["work"] / "current.json").read_text())
    assert Path(current["export"], "manifest.json").is_file()
    after = server.similar_cases(image_id, k=3)
    assert after["model_id"] != before["model_id"]
    assert after["query"] == before["query"]
    top = after["cases"][0]
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and top["label"] == cls  # itself, now indexed
    with Image.open(io.BytesIO(server.localize(image_id)[1])) as im:
        assert im.size == Image.open(_path(setup, image_id)).size


def test_serve_refuses_folders_of_different_models(setup):
    """serve.sh checks the export and the index before it starts anything: the fine-tuned model's index with the
    original export (two models) exits 2 with one line naming both folders; so does a missing folder or --conf."""
    import subprocess

    other_index = next((setup["work"]).glob("model-*/index"))  # written by the train test above
    env = {**os.environ, "MEDSIM_LABEL_VENV": str(VENV)}
    cases = [(["--conf", "export", str(setup["export"]), "--conf", "index", str(other_index)],
              [str(other_index), str(setup["export"]), "different models"]),
             (["--conf", "export", str(setup["export"]), "--conf", "index", str(setup["tmp"] / "nowhere")],
              [str(setup["tmp"] / "nowhere"), "does not exist"]),
             (["--conf", "index", str(setup["index"])], ["--conf export DIR"])]
    for conf, words in cases:
        r = subprocess.run(["bash", str(APP / "serve.sh"), str(setup["studies"]), "--port", "1", *conf], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("serve.sh: ") and "Traceback" not in r.stderr, r.stderr
        assert all(w in lines[0] for w in words), lines[0]
