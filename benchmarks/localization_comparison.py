"""Weakly supervised lesion localization on HAM10000, one protocol for every method (issue 5, part 4).

Each method is a trained run (config.json + best.pt + split.json) and a map: the run's own ``attention`` output
(DSL, ABE, gated attention Ω, loss-based attention patch weights, MIL pooling weights) or Grad-CAM
(``monai.visualize.GradCAM``) of a classifier's predicted class. Every map is scored the same way on the test
images the runs share (the same lesion-grouped split when the runs used the same split recipe):

- the map is upsampled (bilinear) to the 200×150 image with each cell at its receptive-field centre (the model's
  ``attention_geometry``, as ``medsim localize`` does from the export manifest; Grad-CAM maps are at input
  resolution and the prior has no model: stretched), min–max normalised, thresholded with Otsu → mask;
  8-connected components → boxes scored by their mean heat (``medsim.deploy.Localizer``);
- **Dice / IoU** of the mask vs the lesion mask; **pointing game** (map maximum inside the lesion);
  **box hit** (a box with IoU ≥ 0.5 with the lesion box, or containing the lesion centroid);
- **patch precision / recall / F** (loss-based attention's protocol): the attention grid's cells (a cell owns the
  pixels nearest to its centre); a cell is a lesion patch when ≥ 50 % of its pixels are lesion; selected when its normalised attention exceeds Otsu over the
  cells; micro-averaged over images;
- **localization AP@0.5**: all boxes of all images ranked by score; a box is correct when it takes the image's
  ground-truth lesion box (``HAM10000_metadata_ext.csv`` top/bottom/left/right) at IoU ≥ 0.5, each gt box once.

A centred Gaussian (no model) is scored as a reference: HAM10000 lesions sit in the image centre.

    python benchmarks/localization_comparison.py --dataset-dir ../shared/data/ham10000 \
        --method "DSL attention=runs/bench_dsl/dsl__s0" \
        --method "Grad-CAM (classifier)=runs/bench_dsl/classifier__s0:gradcam" \
        --out benchmarks/results/localization_comparison

Writes ``<out>.json``, ``<out>.md`` and ``<out>_overlays.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_ham import (_gradcam, _split_items, _torch_outputs, attention_geometry, ham_boxes,  # noqa: E402
                        score_maps)  # (shared readers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-dir", type=Path, default=Path("../shared/data/ham10000"))
    ap.add_argument("--method", action="append",
                    help="NAME=RUN_DIR[:gradcam] (repeat); ':gradcam' scores Grad-CAM of the run's classifier")
    ap.add_argument("--report-from", type=Path, default=None,
                    help="re-write <out>.md from this results JSON (nothing is scored)")
    ap.add_argument("--reading", type=Path, default=None,
                    help="a hand-written markdown reading to store in the JSON (kept by --report-from re-renders)")
    ap.add_argument("--max-images", type=int, default=0, help="score at most this many shared test images")
    ap.add_argument("--stretch", action="store_true",
                    help="place attention cells as versions before the geometry did (grid stretched over the image), "
                         "to measure what the placement changes")
    ap.add_argument("--out", default="benchmarks/results/localization_comparison")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.report_from is not None:
        doc = json.loads(args.report_from.read_text())
        if args.reading is not None:
            doc["reading"] = args.reading.read_text()
            Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1))
        Path(f"{args.out}.md").write_text(report(doc, args.out))
        return 0
    if not args.method:
        ap.error("--method is required (or --report-from)")
    t0 = time.perf_counter()
    methods: dict[str, tuple[Path, str]] = {}
    for spec in args.method:
        name, _, rest = spec.partition("=")
        run, _, source = rest.partition(":")
        if not name or not run or source not in ("", "gradcam"):
            ap.error(f"--method {spec!r}: expected NAME=RUN_DIR[:gradcam]")
        if not (Path(run) / "best.pt").is_file():
            ap.error(f"--method {spec!r}: {run} has no best.pt")
        methods[name] = (Path(run), source or "attention")

    # the test images every run holds out (the same split recipe gives the same set)
    tests = [{it["image"]: it for it in _split_items(run, "test") if "mask" in it} for run, _ in methods.values()]
    shared = sorted(set.intersection(*(set(t) for t in tests)))
    if args.max_images:
        shared = shared[: args.max_images]
    if not shared:
        raise SystemExit("the runs share no test images with masks (were they trained on the same split?)")
    items = [tests[0][p] for p in shared]
    boxes = ham_boxes(args.dataset_dir)

    results, maps_by_method, seconds = {}, {}, {}
    for name, (run, source) in methods.items():
        t1 = time.perf_counter()
        maps = _gradcam(run, shared) if source == "gradcam" else _torch_outputs(run, shared)["attention"]
        geometry = None if source == "gradcam" or args.stretch else attention_geometry(run, shared[0])
        maps_by_method[name] = (maps, geometry)
        results[name] = {**score_maps(maps, items, boxes, geometry), "run": str(run), "map": source,
                         "map_shape": list(maps.shape[2:]),
                         **({"geometry": geometry.to_dict()} if geometry is not None else {})}
        seconds[name] = round(time.perf_counter() - t1, 1)
        print(f"{name}: {json.dumps({k: round(v, 3) for k, v in results[name].items() if isinstance(v, float)})}",
              flush=True)
    yy, xx = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    prior = np.exp(-(xx ** 2 + yy ** 2) / 0.5)[None, None].repeat(len(items), 0)
    results["centred Gaussian prior (no model)"] = {**score_maps(prior, items, boxes), "map": "prior",
                                                   "map_shape": [16, 16]}
    maps_by_method["centred Gaussian prior (no model)"] = (prior, None)

    _overlays(maps_by_method, items, f"{args.out}_overlays.png")
    doc = {"command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "images": len(items), "results": results, "seconds_per_method": seconds,
           "seconds": round(time.perf_counter() - t0, 1)}
    if args.reading is not None:
        doc["reading"] = args.reading.read_text()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    text = report(doc, args.out)
    Path(f"{args.out}.md").write_text(text)
    print(text)
    return 0


def report(doc: dict, out: str) -> str:
    """The markdown table (+ the stored hand-written reading, if any) of a results JSON."""
    results = doc["results"]
    lines = ["# Lesion localization on HAM10000: every method, one protocol", "",
             f"Command: `{doc['command']}`", "",
             f"{doc['images']} test images shared by all runs (lesion-grouped split; maps upsampled to 200×150 with "
             "each attention cell at its receptive-field centre — 'cell centres' gives the first and last centre in % "
             "of the image width (x) — Otsu threshold; see the script's docstring for each metric).", "",
             "| method | map | cell centres (x) | Dice | IoU | pointing | box hit | patch P | patch R | patch F | AP@0.5 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in results.items():
        shape = "×".join(map(str, v["map_shape"]))
        where = "stretched"
        if v.get("geometry"):
            from medsim.deploy.geometry import AttentionGeometry

            g = AttentionGeometry.from_dict(v["geometry"])
            c = 100 * g.axes[0].centres() / g.input_size[0]
            where = f"{c[0]:.0f}–{c[-1]:.0f} %"
        lines.append(f"| {k} | {v['map']} {shape} | {where} | {v['dice']:.3f} | {v['iou']:.3f} | {v['pointing']:.3f} | "
                     f"{v['box_hit']:.3f} | {v['patch_precision']:.3f} | {v['patch_recall']:.3f} | "
                     f"{v['patch_f']:.3f} | {v['ap50']:.3f} |")
    groups: dict[str, list[dict]] = {}
    for k, v in results.items():  # "NAME [s0]", "NAME [s1]", ...: one training seed each
        groups.setdefault(k.split(" [")[0], []).append(v)
    if any(len(g) > 1 for g in groups.values()):
        keys = ("dice", "iou", "pointing", "box_hit", "patch_f", "ap50")
        lines += ["", "Mean ± std over the training seeds (runs named `NAME [sN]`):", "",
                  "| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for name, g in groups.items():
            cells = [f"{np.mean([v[k] for v in g]):.3f} ± {np.std([v[k] for v in g]):.3f}" for k in keys]
            lines.append(f"| {name} | {len(g)} | " + " | ".join(cells) + " |")
    lines += ["", f"Overlays (rows: methods; white: lesion outline): `{Path(out).name}_overlays.png`. "
                  f"Total {doc['seconds']} s."]
    if doc.get("reading"):
        lines += ["", doc["reading"].rstrip()]
    return "\n".join(lines) + "\n"


def _overlays(maps_by_method: dict[str, tuple], items: list[dict], path: str, n: int = 6) -> None:
    """A sheet: one row per method, ``n`` test images, heatmap + boxes, lesion outline in white."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from medsim.deploy.localizer import Localizer, overlay

    loc = Localizer(threshold="otsu")
    from PIL import ImageDraw

    rows = []
    for name, (maps, geometry) in maps_by_method.items():
        tiles = []
        for k in range(min(n, len(items))):
            img = np.asarray(Image.open(items[k]["image"]).convert("RGB"))
            gt = np.asarray(Image.open(items[k]["mask"]).convert("L")) > 127
            ov = np.array(overlay(loc.localize(maps[k], gt.shape, geometry), img))
            ov[find_boundaries(gt)] = (255, 255, 255)
            tiles.append(ov)
        row = Image.fromarray(np.concatenate(tiles, axis=1))
        draw = ImageDraw.Draw(row)
        draw.rectangle((0, 0, 7 * len(name) + 6, 14), fill=(0, 0, 0))
        draw.text((3, 2), name, fill=(255, 255, 255))
        rows.append(np.asarray(row))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


if __name__ == "__main__":
    raise SystemExit(main())
