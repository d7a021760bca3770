"""End-to-end deployment check on real HAM10000 runs (issue 4's "done when"):

1. export a trained DSL run to ONNX (parity-checked), index its training split through the torch-free engine,
   search with its test split, and compare R@1 / top-5 with PyTorch's exact retrieval on the same split;
2. localize lesions on the test images from the DSL attention, the classifier run's own attention, Grad-CAM
   (``monai.visualize.GradCAM``) on the classifier run, and a centred-Gaussian prior; Dice / IoU / pointing game /
   box hit rate against the HAM10000 lesion masks.

    python benchmarks/deploy_ham.py --run runs/bench_dsl/dsl__s1 --classifier-run runs/bench_dsl/classifier__s0 \
        --out benchmarks/results/deploy_ham

(the runs come from ``benchmarks/dsl_table1.py``). Writes ``<out>.json``, ``<out>.md`` and ``<out>_overlays.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def _split_items(run: Path, split: str) -> list[dict]:
    from medsim.data.splits import load_split  # joins split.local.json's image/mask paths (absolute)

    return load_split(run / "split.json")[split]


def _torch_outputs(run: Path, paths: list[str], batch: int = 64) -> dict[str, np.ndarray]:
    import torch

    from medsim.export.run import load_run, preprocess_items

    lr = load_run(run)
    outs: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            o = lr.network(torch.as_tensor(preprocess_items(paths[i:i + batch], lr.transform)))
            for k, v in o.items():
                outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def _gradcam(run: Path, paths: list[str], batch: int = 32) -> np.ndarray:
    """Grad-CAM of the classifier's predicted class at the output of the backbone's last stage (``layer3`` of
    the Embedder's ``backbone`` or FineGrainedMIL's global ``trunk``): (N, 1, x, y)."""
    import torch
    from monai.visualize import GradCAM

    from medsim.export.run import load_run, preprocess_items

    lr = load_run(run)

    class Logits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)["logits"]

    model = Logits(lr.network).eval()
    trunk = "backbone" if hasattr(lr.network, "backbone") else "trunk"  # Embedder / FineGrainedMIL
    last = [name for name, _ in getattr(lr.network, trunk).named_children()][-1]
    cam = GradCAM(nn_module=model, target_layers=f"net.{trunk}.{last}")
    maps = []
    for i in range(0, len(paths), batch):
        x = torch.as_tensor(preprocess_items(paths[i:i + batch], lr.transform))
        maps.append(cam(x).detach().numpy())
    return np.concatenate(maps)


def ham_boxes(dataset_dir: Path) -> dict[str, tuple[int, int, int, int]]:
    """image stem → lesion box (x0, y0, x1, y1) from ``HAM10000_metadata_ext.csv`` (empty when absent)."""
    f = dataset_dir / "HAM10000_metadata_ext.csv"
    if not f.is_file():
        return {}
    with open(f, newline="") as fh:
        return {r["image_id"]: (int(r["left"]), int(r["top"]), int(r["right"]), int(r["bottom"]))
                for r in csv.DictReader(fh) if r.get("left")}


def attention_geometry(run: Path, path: str):
    """The run's network's :class:`~medsim.deploy.geometry.AttentionGeometry` for its input size (the size
    ``eval#preprocessing`` gives ``path``): where each attention cell sits on the image."""
    from medsim.export.run import load_run, preprocess_items

    lr = load_run(run)
    return lr.network.attention_geometry(preprocess_items([path], lr.transform).shape[2:])


def score_maps(maps: np.ndarray, items: list[dict], boxes: dict[str, tuple], geometry=None) -> dict[str, float]:
    """The whole protocol for one method's maps (N, 1, x, y) on ``items`` (with ``image`` and ``mask``); each map
    cell is placed at its centre from ``geometry`` (``None``: stretched over the image — right for maps at input
    resolution such as Grad-CAM)."""
    from PIL import Image

    from medsim.deploy.localizer import (Localizer, average_precision, box_hit, dice, iou, mask_box,
                                         match_boxes, patch_counts, pointing_game)

    loc = Localizer(threshold="otsu")
    rows, counts, det_scores, det_tp = [], np.zeros(3, np.int64), [], []
    for m, it in zip(maps, items):
        with Image.open(it["mask"]) as im:
            gt = np.asarray(im.convert("L")) > 127
        out = loc.localize(m, gt.shape, geometry)
        rows.append((dice(out.mask, gt), iou(out.mask, gt), float(pointing_game(out.heatmap, gt)),
                     float(box_hit(out.boxes, gt))))
        counts += patch_counts(m, gt, geometry=geometry)
        gbox = boxes.get(Path(it["image"]).stem) or mask_box(gt)
        ranked = [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in out.boxes]
        det_scores += [b["score"] for b in out.boxes]
        det_tp += match_boxes(ranked, [gbox])
    a = np.asarray(rows)
    tp, fp, fn = (int(v) for v in counts)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"dice": float(a[:, 0].mean()), "iou": float(a[:, 1].mean()), "pointing": float(a[:, 2].mean()),
            "box_hit": float(a[:, 3].mean()), "patch_precision": p, "patch_recall": r,
            "patch_f": 2 * p * r / (p + r) if p + r else 0.0,
            "ap50": average_precision(det_scores, det_tp, len(items)),
            "boxes_per_image": len(det_scores) / len(items), "n": len(items)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="DSL run directory (config.json, best.pt, split.json)")
    ap.add_argument("--classifier-run", required=True, help="classifier-variant run on the same split")
    ap.add_argument("--out", default="benchmarks/results/deploy_ham")
    ap.add_argument("--work", default="runs/deploy_ham")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.localizer import Localizer
    from medsim.deploy.tasks import build_index
    from medsim.export.pipeline import export_run

    run, crun, work = Path(args.run), Path(args.classifier_run), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    exp = export_run(run, work / "model")
    train, test = _split_items(run, "training"), _split_items(run, "test")
    r = build_index(work / "model", run / "split.json", work / "index", split="training", progress=False)

    from medsim.deploy.index import CaseIndex

    index = CaseIndex.load(work / "index")
    with EmbeddingEngine(work / "model") as engine:
        out = engine.embed([it["image"] for it in test])
    hits = index.search(out["embedding"], 5)
    uri_label = {it["image"]: it["label_name"] for it in train}
    eng_top = [[h.record["uri"] for h in row] for row in hits]
    r1_engine = float(np.mean([uri_label[row[0]] == it["label_name"] for row, it in zip(eng_top, test)]))

    tt = _torch_outputs(run, [it["image"] for it in test])
    tg = _torch_outputs(run, [it["image"] for it in train])["embedding"]
    ref = np.argsort(-(tt["embedding"] @ tg.T), axis=1)[:, :5]
    torch_top = [[train[j]["image"] for j in row] for row in ref]
    r1_torch = float(np.mean([train[row[0]]["label_name"] == it["label_name"] for row, it in zip(ref, test)]))
    same_top1 = float(np.mean([a[0] == b[0] for a, b in zip(eng_top, torch_top)]))
    same_top5 = float(np.mean([a == b for a, b in zip(eng_top, torch_top)]))

    with_mask = [it for it in test if "mask" in it]
    idx = [i for i, it in enumerate(test) if "mask" in it]
    loc = Localizer(threshold="otsu")
    crun_out = _torch_outputs(crun, [it["image"] for it in with_mask])
    gcam = _gradcam(crun, [it["image"] for it in with_mask])
    shape = out["attention"].shape[-2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), indexing="ij")
    prior = np.exp(-(xx ** 2 + yy ** 2) / 0.5)[None, None].repeat(len(with_mask), 0)
    methods = {"DSL attention (engine, ONNX)": out["attention"][idx],
               "classifier's attention module": crun_out["attention"],
               "Grad-CAM on the classifier (layer3)": gcam,
               "centred Gaussian prior (no model)": prior}
    boxes = ham_boxes(Path(train[0]['image']).parents[1])
    loc_rows = {name: score_maps(m, with_mask, boxes) for name, m in methods.items()}

    # a picture: 8 test images with the DSL overlay and the Grad-CAM overlay
    from PIL import Image

    from medsim.deploy.localizer import overlay

    tiles = []
    for k in range(8):
        it = with_mask[k]
        img = np.asarray(Image.open(it["image"]).convert("RGB"))
        gt = np.asarray(Image.open(it["mask"]).convert("L")) > 127
        for m in (out["attention"][idx][k], gcam[k]):
            ov = np.array(overlay(loc.localize(m, gt.shape), img))
            edge = gt ^ np.pad(gt, 1)[2:, 1:-1] | gt ^ np.pad(gt, 1)[1:-1, 2:]
            ov[edge] = (255, 255, 255)
            tiles.append(ov)
    h, w = tiles[0].shape[:2]
    sheet = np.zeros((4 * h, 4 * w, 3), np.uint8)
    for i, t in enumerate(tiles):
        sheet[(i // 4) * h:(i // 4 + 1) * h, (i % 4) * w:(i % 4 + 1) * w] = t
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(f"{args.out}_overlays.png")

    doc = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "run": str(run), "classifier_run": str(crun), "export": {"parity": exp["manifest"].get("parity")},
           "index": r, "retrieval": {"queries": len(test), "gallery": len(train), "R@1_engine": r1_engine,
                                     "R@1_pytorch": r1_torch, "same_top1": same_top1, "same_top5": same_top5},
           "localization": loc_rows, "attention_shape": list(shape), "seconds": round(time.perf_counter() - t0, 1)}
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = ["# Deployment check on HAM10000", "", f"Command: `{doc['command']}`", "",
             f"Export of `{run}` (ONNX opset 17, parity vs PyTorch in the manifest), index of its training split "
             f"({len(train)} cases, exact flat index, engine backend {r['backend']}), queries = its test split "
             f"({len(test)} images).", "",
             "| retrieval | R@1 | top-1 same as PyTorch | top-5 same as PyTorch |", "|---|---|---|---|",
             f"| engine + faiss index | {r1_engine:.4f} | {same_top1:.4f} | {same_top5:.4f} |",
             f"| PyTorch, exact cosine | {r1_torch:.4f} | 1 | 1 |", "",
             f"Localization on the {len(with_mask)} test images (Otsu threshold on the upsampled map, 8-connected "
             f"components; box hit = IoU ≥ 0.5 with the mask's box or the box contains the mask centroid):", "",
             "| map | Dice | IoU | pointing game | box hit |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['dice']:.3f} | {v['iou']:.3f} | {v['pointing']:.3f} | {v['box_hit']:.3f} |"
              for k, v in loc_rows.items()]
    lines += ["", f"Overlays (left: DSL attention, right: Grad-CAM; white: ground-truth outline): "
                  f"`{Path(args.out).name}_overlays.png`.", f"Total {doc['seconds']} s."]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
