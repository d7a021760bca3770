"""Request latency of medsim's MONAI Label app on a real ``monailabel start_server`` (issue 13).

Exports a trained run, indexes its training split, puts ``--studies`` of its test images into a studies folder
and starts the server on a loopback port (``deploy/monailabel/serve.sh``, the environment of
``deploy/monailabel/install.sh``). Then, per request kind, one client in series (``--repeats`` each, after one
warm-up): ``similar_cases`` (k = 5, with and without thumbnails), ``localize`` (JSON; label image),
``activelearning`` (first call embeds the unlabelled pool, later calls reuse the cache); and ``--clients``
concurrent clients × ``--requests`` similar-case requests each (median, p95, throughput). Every concurrent answer
is checked against the serial one.

    python benchmarks/monailabel_latency.py --run runs/isic_dsl --dataset-dir ../shared/data/ham10000

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "monailabel"))
from client import LabelClient, concurrent_similar_cases, serve  # noqa: E402  deploy/monailabel/client.py

from ham_recipe import command_line, write_results  # noqa: E402  benchmarks/ham_recipe.py


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": int(a.size), "median_ms": round(float(np.median(a)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "mean_ms": round(float(a.mean()), 1), "max_ms": round(float(a.max()), 1)}


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return (time.perf_counter() - t0) * 1000.0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished `medsim train` run folder")
    ap.add_argument("--dataset-dir", required=True, help="unused except to record where the images are from")
    ap.add_argument("--work", default="runs/bench_monailabel", help="export, index and studies (deleted first)")
    ap.add_argument("--out", default="benchmarks/results/monailabel_latency")
    ap.add_argument("--studies", type=int, default=40, help="test images in the studies folder")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--threads", default="2", help="MEDSIM_THREADS of the server (onnxruntime intra-op threads)")
    ap.add_argument("--picture-rows", type=int, default=3, help="study images in the picture of the app's answers")
    ap.add_argument("--venv", default=os.environ.get("MEDSIM_LABEL_VENV", str(ROOT / "deploy/monailabel/.venv")))
    args = ap.parse_args(argv)

    from medsim.data.splits import load_split
    from medsim.deploy.tasks import build_index
    from medsim.export.pipeline import export_run

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    export_run(args.run, work / "export")
    build = build_index(work / "export", Path(args.run) / "split.json", work / "index", progress=False)
    prep_s = time.perf_counter() - t0
    studies = work / "studies"
    studies.mkdir()
    test = load_split(Path(args.run) / "split.json")["test"][: args.studies]
    for it in test:
        shutil.copy(it["image"], studies / Path(it["image"]).name)
    ids = sorted(p.stem for p in studies.iterdir())
    conf = {"export": work / "export", "index": work / "index", "work": work / "app"}
    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    with serve(studies, conf, venv=args.venv, log=work / "server.log",
               env={"MEDSIM_THREADS": args.threads}) as c:
        start_s = time.perf_counter() - t_start
        rng = np.random.default_rng(0)
        pick = [ids[int(i)] for i in rng.integers(len(ids), size=args.repeats + 1)]
        kinds = {
            "similar_cases (k=5, thumbnails)": lambda i: c.similar_cases(i, k=5),
            "similar_cases (k=5, no thumbnails)": lambda i: c.similar_cases(i, k=5, params={"thumbnails": 0}),
            "localize (JSON: boxes)": lambda i: c.infer("localize", i, output="json"),
            "localize (label image)": lambda i: c.infer("localize", i, output="image"),
        }
        for name, fn in kinds.items():
            fn(pick[0])  # warm-up
            results[name] = stats([timed(fn, i)[0] for i in pick[1:]])
            print(f"{name:<36} {results[name]}", flush=True)
        first, _ = timed(c.next_sample, "medsim_hybrid")
        later = [timed(c.next_sample, "medsim_hybrid")[0] for _ in range(min(args.repeats, 10))]
        results[f"activelearning hybrid: first call (embeds {len(ids)} images)"] = stats([first])
        results["activelearning hybrid: later calls (cached)"] = stats(later)
        expected = {i: [h["id"] for h in c.similar_cases(i, k=5, params={"thumbnails": 0})["cases"]] for i in ids}
        run = concurrent_similar_cases(c.url, ids, expected, clients=args.clients, requests=args.requests)
        lat, wrong, wall = run["latencies_ms"], run["errors"], run["wall_s"]
        conc = stats(lat)
        conc.update(throughput_rps=round(len(lat) / wall, 1), wrong_answers=len(wrong), wall_s=round(wall, 1))
        results[f"similar_cases, {args.clients} concurrent clients x {args.requests}"] = conc
        print(conc, flush=True)
        info = c.info()
        truth = {Path(it["image"]).stem: it.get("label_name") for it in test}
        picture(c, studies, ids[: args.picture_rows], truth,
                Path(args.out).with_name(Path(args.out).name + "_answer.png"))
    manifest = json.loads((work / "export" / "manifest.json").read_text())
    doc = {"command": command_line(argv), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "model": {"run": str(args.run), "network": manifest.get("network"), "input": manifest.get("input"),
                     "indexed_cases": build["cases"]},
           "studies": len(ids), "server_start_s": round(start_s, 1), "export_and_index_s": round(prep_s, 1),
           "server_threads": args.threads, "tasks": sorted(info["models"]), "results": results,
           "picture": str(Path(args.out).with_name(Path(args.out).name + "_answer.png"))}
    return write_results(args.out, doc, report)


def picture(c: LabelClient, studies: Path, ids: list[str], truth: dict[str, str | None], out: Path,
            size: int = 160) -> None:
    """What a client gets, drawn: per study image, the image with the returned lesion label (red outline) and
    boxes (yellow), then the similar cases' thumbnails with their label and score."""
    import base64
    import io

    from PIL import Image, ImageDraw, ImageFilter

    rows = []
    for i in ids:
        params, label_png = c.localize(i)
        sim = c.similar_cases(i, k=5, params={"thumbnails": size})
        with Image.open(next(studies.glob(f"{i}.*"))) as im:
            img = im.convert("RGB")
        mask = Image.open(io.BytesIO(label_png)).point(lambda v: 255 if v else 0).convert("L")
        edge = mask.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(5))
        img.paste((255, 40, 40), mask=edge)
        d = ImageDraw.Draw(img)
        for b in params["boxes"][:3]:
            d.rectangle([b["x0"], b["y0"], b["x1"] - 1, b["y1"] - 1], outline=(255, 220, 0), width=3)
        img.thumbnail((size * 4 // 3, size))
        tiles = [(img, f"query ({truth.get(i)}): /infer/localize")]
        for case in sim["cases"]:
            t = Image.open(io.BytesIO(base64.b64decode(case["thumbnail"].split(",", 1)[1]))).convert("RGB")
            tiles.append((t, f"#{case['rank']} {case['label']}  {case['score']:.3f}"))
        rows.append(tiles)
    w = max(sum(t.width + 8 for t, _ in r) for r in rows) + 8
    h = len(rows) * (size + 28) + 30
    sheet = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(sheet)
    d.text((8, 8), "medsim MONAI Label app: localize (red: returned lesion label, yellow: boxes) and "
                   "similar_cases (top 5: label, cosine score)", fill=(0, 0, 0))
    y = 30
    for r in rows:
        x = 8
        for t, caption in r:
            sheet.paste(t, (x, y))
            d.text((x, y + t.height + 2), caption, fill=(0, 0, 0))
            x += t.width + 8
        y += size + 28
    sheet.save(out)
    print(f"wrote {out}")


def report(doc: dict) -> str:
    m = doc["model"]
    lines = [
        "# MONAI Label app: request latency (real `monailabel start_server`, loopback HTTP)", "",
        f"Command: `{doc['command']}`", "",
        f"Model: {m['network'].get('class') if isinstance(m['network'], dict) else m['network']} from `{m['run']}`, "
        f"input {m['input'].get('shape') if isinstance(m['input'], dict) else m['input']}; index of "
        f"{m['indexed_cases']} cases (flat, inner product); studies folder of {doc['studies']} test images. "
        f"Server: MONAI Label 0.8.5 in deploy/monailabel's environment, onnxruntime CPU with "
        f"MEDSIM_THREADS={doc['server_threads']}, on a {doc['machine']['cpus']}-core CPU with no GPU; the clients run "
        f"on the same machine. Server start to first `/info/` answer: {doc['server_start_s']} s.", "",
        "| request | n | median (ms) | p95 (ms) | mean (ms) | max (ms) | throughput (req/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in doc["results"].items():
        lines.append(f"| {name} | {r['n']} | {r['median_ms']} | {r['p95_ms']} | {r['mean_ms']} | {r['max_ms']} | "
                     f"{r.get('throughput_rps', '–')} |")
    lines += ["", "`similar_cases` embeds the query on every request (no cache); thumbnails of indexed cases are cached "
              "after their first use. `activelearning` caches the pool's outputs per file (path, size, mtime).",
              "", f"The answers drawn: `{Path(doc['picture']).name}`." if doc.get("picture") else ""]
    conc = [r for n, r in doc["results"].items() if "concurrent" in n]
    if conc:
        lines += ["", f"Concurrent answers checked against the serial ones: {conc[0]['wrong_answers']} wrong."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
