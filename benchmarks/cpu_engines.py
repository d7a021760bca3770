"""CPU engines for one model (issue 16): PyTorch eager fp32 and bf16 autocast + channels_last, onnxruntime fp32 and
static INT8, OpenVINO fp32 / bf16 / NNCF INT8 — throughput at batch 1 and 32 and what each costs in validation
R@1 and class-balanced R@1.

The model: an existing run (``--run``), or ``--image-size 128|224``: a full-width MONAI ResNet18 or ResNet50
(``--backbone``; the isic_dsl bundle, ``widen_factor`` 1) trained for ``--epochs`` on ``--dataset-dir`` (HAM10000)
into ``--work``.

Steps:

1. ``medsim.export.export_run`` twice: ``model.onnx`` + onnxruntime static INT8 (``quantize="static"``), then the
   OpenVINO checks and NNCF INT8 (``quantize="openvino"``) — the exports ``medsim export`` writes, with their
   manifest records (OpenVINO parity, cosine, R@1 change, the export-time ``cpu_timing``).
2. Embeddings of the validation split from every engine: R@1 and class-balanced R@1
   (:mod:`medsim.metrics.retrieval`) and the mean cosine to PyTorch eager fp32.
3. Throughput in interleaved rounds with quiet-round filtering, as ``benchmarks/ort_throughput.py`` does (its
   ``timed`` / ``wait_quiet``): the engines run through medsim's own runners (:mod:`medsim.runtime.runners`),
   with ``--threads`` threads everywhere.

    python benchmarks/cpu_engines.py --image-size 128 --out benchmarks/results/cpu_engines_r18_128

Writes ``<out>.json`` (every round) and ``<out>.md`` (table, ratios to PyTorch eager fp32, the exact command).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ham_recipe import command_line, write_results  # noqa: E402  benchmarks/ham_recipe.py
from ort_throughput import add_timing_options, cpu_info, cpu_mhz, timed, wait_quiet  # noqa: E402  benchmarks/ort_throughput.py

ENGINES = ("pytorch_fp32", "pytorch_bf16_cl", "ort_fp32", "ort_int8", "openvino_fp32", "openvino_bf16",
           "openvino_int8")
LABELS = {"pytorch_fp32": "PyTorch eager fp32", "pytorch_bf16_cl": "PyTorch bf16 autocast + channels_last",
          "ort_fp32": "onnxruntime fp32", "ort_int8": "onnxruntime INT8 static QDQ",
          "openvino_fp32": "OpenVINO fp32 (same ONNX file)", "openvino_bf16": "OpenVINO bf16 (precision hint)",
          "openvino_int8": "OpenVINO INT8 (NNCF)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a trained run directory")
    src.add_argument("--image-size", type=int, choices=(128, 224),
                     help="train a full-width MONAI --backbone (isic_dsl) at this size first")
    ap.add_argument("--backbone", default="resnet18", choices=("resnet18", "resnet50"),
                    help="with --image-size: the isic_dsl backbone to train")
    ap.add_argument("--dataset-dir", default="../shared/data/ham10000", help="with --image-size: the dataset")
    ap.add_argument("--epochs", type=int, default=1, help="with --image-size: training epochs")
    ap.add_argument("--work", default="runs/cpu_engines", help="run and export folders")
    ap.add_argument("--out", default="benchmarks/results/cpu_engines")
    add_timing_options(ap, rounds=9)
    ap.add_argument("--images", type=int, default=None, help="at most this many validation images (smoke tests)")
    ap.add_argument("--max-calibration", type=int, default=256, help="training images for INT8 calibration")
    ap.add_argument("--split", default="test", choices=("validation", "test"),
                    help="the split R@1 and top-k agreement are measured on")
    ap.add_argument("--topk", type=int, default=5, help="top-k agreement with PyTorch fp32 (queries in the split)")
    return ap.parse_args(argv)


def topk_ids(emb: np.ndarray, k: int) -> np.ndarray:
    """(N, k) the k nearest other items of each item by cosine (self excluded), best first."""
    from medsim.runtime.ties import topk_neighbours

    return topk_neighbours(emb, emb, k, exclude_diagonal=True)[0]


def topk_agreement(emb: np.ndarray, ref: np.ndarray, k: int) -> dict[str, float]:
    """Share of queries whose top-``k`` from ``emb`` equals ``ref``'s: as a set, in the same order, and up to
    near-ties (each of ``emb``'s top-k, scored with ``ref``, is no worse than ``ref``'s item at that rank by more
    than 1e-3 cosine: a swap of two neighbours the reference itself barely tells apart)."""
    a, b = topk_ids(emb, k), topk_ids(ref, k)
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    sa, sb = (r[:, None, :] * r[a]).sum(-1), (r[:, None, :] * r[b]).sum(-1)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    off = ~np.eye(len(ref), dtype=bool)
    err = np.abs(e @ e.T - r @ r.T)[off]  # every pairwise score: how far the engine moves it
    ranked = -np.sort(-np.where(off, r @ r.T, -np.inf), axis=1)
    gap = ranked[:, k - 1] - ranked[:, k] if ranked.shape[1] > k else np.full(len(ref), np.inf)
    p90 = float(np.percentile(err, 90))
    return {"same_set": float(np.mean([set(x) == set(y) for x, y in zip(a, b)])),
            "same_order": float(np.mean((a == b).all(1))),
            "within_ties": float(np.mean((sa >= sb - 1e-3).all(1))),
            "same_top1": float(np.mean(a[:, 0] == b[:, 0])),
            "score_error_p50": float(np.median(err)), "score_error_p90": p90,
            # queries whose reference top-k ends closer to the next item than the engine's typical score error
            "ref_gap_below_p90_error": float(np.mean(gap < p90))}


#: reduced-precision engines, the fp32 engine of the same backend their recheck re-embeds with, and the manifest
#: record of their recheck margin
RECHECKED = {"openvino_bf16": ("openvino_fp32", ("openvino", "bf16")),
             "openvino_int8": ("openvino_fp32", ("openvino", "int8")), "ort_int8": ("ort_fp32", ("int8",))}


def recheck_quality(emb: dict[str, np.ndarray], manifest: dict[str, Any]) -> dict[str, Any]:
    """For each reduced-precision engine: the export's recheck margin (calibrated on the validation split) and what
    it does on this split (queries at reduced precision, leave-one-out against the same backend's fp32 embeddings
    as the index): top-k set agreement with and without the recheck and the share rechecked, k = 1, 5, 10."""
    from medsim.runtime.ties import recheck_outcome

    out = {}
    for e, (ref, path) in RECHECKED.items():
        rec = manifest
        for key in (*path, "recheck"):
            rec = (rec or {}).get(key)
        if e in emb and rec:
            out[e] = {"margin": rec["margin"], "method": rec["method"], "calibration_images": rec["images"],
                      "calibration_by_k": rec["by_k"], "fp32": ref,
                      "by_k": recheck_outcome(emb[ref], emb[e], rec["margin"])}
    return out


def search_pipeline(embed: Callable[[np.ndarray], np.ndarray], gallery: np.ndarray, x: np.ndarray, *, k: int,
                    batch: int = 32, margin: float | None = None,
                    embed32: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """What `medsim search` does per batch of query images ``x``: embed, find the k (+1) nearest of ``gallery``
    (fp32 index), and with ``margin`` re-embed near ties with ``embed32`` and search those again. Returns how many
    queries were rechecked (timed by the caller)."""
    from medsim.runtime.ties import near_ties, topk_neighbours

    rechecked = 0
    for s in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[s:s + batch])
        _, scores = topk_neighbours(embed(xb), gallery, k + 1)
        if margin is not None and embed32 is not None:
            ties = near_ties(scores, k, margin)
            if ties.any():
                topk_neighbours(embed32(np.ascontiguousarray(xb[ties])), gallery, k)
                rechecked += int(ties.sum())
    return rechecked


def time_pipelines(fns: dict[str, Callable[[np.ndarray], np.ndarray]], gallery: np.ndarray, x: np.ndarray,
                   margin: float | None, *, k: int, rounds: int) -> dict[str, Any]:
    """Images/s of a whole search of the split's queries at batch 32 (embedding + search of an fp32 index), in
    interleaved rounds: PyTorch eager fp32, onnxruntime fp32, OpenVINO fp32, OpenVINO bf16 alone, and OpenVINO bf16
    with the fp32 recheck at ``margin``."""
    plans = {"pytorch_fp32": (fns["pytorch_fp32"], None), "ort_fp32": (fns["ort_fp32"], None),
             "openvino_fp32": (fns["openvino_fp32"], None), "openvino_bf16": (fns["openvino_bf16"], None),
             "openvino_bf16_recheck": (fns["openvino_bf16"], margin)}
    per: dict[str, list[float]] = {p: [] for p in plans}
    rechecked = 0
    for _ in range(rounds):
        for name, (fn, m) in plans.items():
            t0 = time.perf_counter()
            n = search_pipeline(fn, gallery, x, k=k, margin=m, embed32=fns["openvino_fp32"])
            per[name].append(len(x) / (time.perf_counter() - t0))
            rechecked = n if m is not None else rechecked
    med = {p: statistics.median(v) for p, v in per.items()}
    return {"queries": int(len(x)), "k": k, "batch": 32, "rounds": rounds, "margin": margin,
            "rechecked": rechecked, "img_per_s_median": med, "rounds_img_per_s": per,
            "ratio_vs_pytorch_fp32": {p: v / med["pytorch_fp32"] for p, v in med.items()}}


def train_model(args: argparse.Namespace) -> Path:
    """A full-width ``--backbone`` isic_dsl run at ``--image-size`` (reused when ``--work`` already holds it)."""
    from medsim.engines.workflow import train_bundle

    out = Path(args.work) / f"r{args.backbone.removeprefix('resnet')}_{args.image_size}"
    if (out / "best.pt").is_file():
        return out
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "isic_dsl"
    train_bundle(bundle, dataset_dir=args.dataset_dir, output_dir=str(out),
                 overrides={"max_epochs": args.epochs, "image_size": args.image_size, "backbone": args.backbone,
                            "widen_factor": 1})
    return out


def engines(run: Any, export: Path, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every engine as ``f(batch (B, C, *S) float32) -> embeddings (B, D)``; OpenVINO bf16 only on CPUs that have
    it (noted in the result)."""
    import torch

    from medsim.export.manifest import read_manifest
    from medsim.runtime.runners import OrtRunner, OvRunner, openvino_missing, ort_session

    m = read_manifest(export)
    net = run.network.eval()
    net_cl = __import__("copy").deepcopy(net).to(memory_format=torch.channels_last)

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x))["embedding"].numpy()

    def bf16_cl(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net_cl(t)["embedding"].float().numpy()

    def wrap(runner: Any) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: runner(x)["embedding"]

    out = {"pytorch_fp32": eager, "pytorch_bf16_cl": bf16_cl,
           "ort_fp32": wrap(OrtRunner(ort_session(export / m["model"], threads=threads), ["embedding"])),
           "ort_int8": wrap(OrtRunner(ort_session(export / m["int8"]["model"], threads=threads), ["embedding"])),
           "openvino_fp32": wrap(OvRunner(export / m["model"], "fp32", threads, ["embedding"]))}
    if not openvino_missing("bf16"):
        out["openvino_bf16"] = wrap(OvRunner(export / m["model"], "bf16", threads, ["embedding"]))
    out["openvino_int8"] = wrap(OvRunner(export / m["openvino"]["int8"]["model"], "fp32", threads, ["embedding"]))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    command = command_line(argv)
    os.environ["MEDSIM_THREADS"] = str(args.threads)  # the export's own runners and timing use it too

    import onnxruntime
    import openvino
    import torch

    from medsim.export import export_run
    from medsim.export.run import load_run, split_images
    from medsim.metrics.retrieval import class_balanced_retrieval, recall_at_k

    torch.set_num_threads(args.threads)
    t_start = time.time()
    run_dir = Path(args.run) if args.run else train_model(args)
    export = Path(args.work) / f"export_{run_dir.name}"
    t0 = time.perf_counter()
    lines = export_run(run_dir, export, quantize="static", max_calibration=args.max_calibration)["lines"]
    lines += export_run(run_dir, export, onnx=False, quantize="openvino", max_calibration=args.max_calibration)["lines"]
    t_export = time.perf_counter() - t0
    for line in lines:
        print(line, flush=True)

    run = load_run(run_dir)
    val, labels, val_split = split_images(run, args.split, limit=args.images)
    fns = engines(run, export, args.threads)
    names = [e for e in ENGINES if e in fns]

    # R@1 / class-balanced R@1 on the validation split, every engine
    emb = {e: np.concatenate([fns[e](np.ascontiguousarray(val[i:i + 32])) for i in range(0, len(val), 32)])
           for e in names}
    ref = emb["pytorch_fp32"]
    quality = {}
    for e in names:
        r1 = float(recall_at_k(emb[e], labels, ks=1)["R@1"])
        bal = float(class_balanced_retrieval(emb[e], labels, digits=None)["R@1_balanced"])
        cos = float(np.mean(np.sum(emb[e] * ref, 1) / (np.linalg.norm(emb[e], axis=1) * np.linalg.norm(ref, axis=1))))
        quality[e] = {"R@1": r1, "R@1_balanced": bal, "mean_cosine_to_pytorch_fp32": cos,
                      f"top{args.topk}_vs_pytorch_fp32": topk_agreement(emb[e], ref, args.topk)}
    for e in ("openvino_bf16", "openvino_int8"):  # the same engine's own fp32: what --precision changes
        if e in emb:
            quality[e][f"top{args.topk}_vs_openvino_fp32"] = topk_agreement(emb[e], emb["openvino_fp32"], args.topk)
    for e in names:
        quality[e]["dR@1_points"] = 100 * (quality[e]["R@1"] - quality["pytorch_fp32"]["R@1"])
        quality[e]["dR@1_balanced_points"] = 100 * (quality[e]["R@1_balanced"] - quality["pytorch_fp32"]["R@1_balanced"])
    manifest = json.loads((export / "manifest.json").read_text())
    recheck = recheck_quality(emb, manifest)
    pipelines = None
    if "openvino_bf16" in recheck:  # a whole search of the split, the recheck's cost included
        pipelines = time_pipelines(fns, emb["openvino_fp32"], val, recheck["openvino_bf16"]["margin"],
                                   k=args.topk, rounds=min(args.rounds, 5))
        print("search pipelines: " + ", ".join(f"{p} {v:.0f} img/s" for p, v in
                                               pipelines["img_per_s_median"].items())
              + f"; rechecked {pipelines['rechecked']} of {len(val)}", flush=True)

    # throughput: interleaved rounds, quiet-round filtering
    cells = []
    for bs in args.batches:
        x = np.ascontiguousarray(np.resize(val, (bs, *val.shape[1:])), dtype=np.float32)
        cells += [(e, bs, (lambda f=fns[e], xx=x: f(xx))) for e in names]
    for _, bs, fn in cells:
        timed(fn, bs, args.warmup)
        time.sleep(args.pause)
    rounds: dict[str, list[float]] = {f"{e}@{bs}": [] for e, bs, _ in cells}
    other: dict[str, list[float]] = {k: [] for k in rounds}
    quiet, waits = [], []
    for r in range(args.rounds):
        waits.append(round(wait_quiet(args.quiet_cpu, args.max_wait)[0], 2))
        for e, bs, fn in cells:
            ips, o, _ = timed(fn, bs, args.seconds)
            rounds[f"{e}@{bs}"].append(ips)
            other[f"{e}@{bs}"].append(o)
            time.sleep(args.pause)
        quiet.append(max(v[-1] for v in other.values()) < args.quiet_cpu)
        print(f"round {r + 1}/{args.rounds} ({'quiet' if quiet[-1] else 'loaded'}): "
              + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rounds.items()), flush=True)
    q_idx = [i for i, ok in enumerate(quiet) if ok]

    def summarise(idx: list[int]) -> list[dict[str, Any]]:
        rows = []
        for bs in args.batches:
            base = statistics.median(rounds[f"pytorch_fp32@{bs}"][i] for i in idx)
            for e in names:
                v = [rounds[f"{e}@{bs}"][i] for i in idx]
                med = statistics.median(v)
                rows.append({"engine": e, "label": LABELS[e], "batch": bs, "n_rounds": len(idx),
                             "img_per_s_median": med, "img_per_s_min": min(v), "img_per_s_max": max(v),
                             "ratio_vs_pytorch_fp32": med / base, **quality[e], "rounds": v})
        return rows

    doc = {"command": command, "config": vars(args), "run": str(run_dir), "export": str(export),
           "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
           "wall_s": round(time.time() - t_start, 1), "export_s": round(t_export, 1),
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "onnxruntime": onnxruntime.__version__, "openvino": openvino.get_version(),
                       "threads": args.threads, "mhz": cpu_mhz(), **cpu_info(),
                       "quiet_rounds": q_idx, "wait_before_round_s": waits, "other_jobs_cpus": other},
           "engines_skipped": {e: "this CPU has no bf16 (OpenVINO OPTIMIZATION_CAPABILITIES)" for e in ENGINES
                               if e not in fns},
           "validation": {"split": val_split, "images": int(len(val)), "name": args.split}, "quality": quality,
           "export_manifest": {k: manifest.get(k) for k in ("openvino", "cpu_timing", "int8")},
           "recheck": recheck, "search_pipelines": pipelines,
           "rows": summarise(list(range(args.rounds))),
           "rows_quiet_rounds": summarise(q_idx) if len(q_idx) >= 3 else None}
    return write_results(args.out, doc, render_md)


def render_md(doc: dict[str, Any]) -> str:
    rows = doc["rows_quiet_rounds"] or doc["rows"]
    which = "quiet rounds" if doc["rows_quiet_rounds"] else "all rounds (fewer than 3 quiet ones)"
    m = doc["machine"]
    out = [f"# CPU engines: {doc['run']}", "",
           f"Command: `{doc['command']}`", "",
           f"{m.get('Model name', '?')}, {m['threads']} threads; torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
           f"OpenVINO {m['openvino']}. R@1 and top-k on the {doc['validation'].get('name', 'validation')} split: "
           f"{doc['validation']['images']} images ({doc['validation']['split']}). Medians over {which}.", "",
           "| engine | batch | img/s | × PyTorch fp32 | R@1 | ΔR@1 (pt) | balanced R@1 | Δ balanced (pt) | cosine |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['batch']} | {r['img_per_s_median']:.1f} | {r['ratio_vs_pytorch_fp32']:.2f} "
                   f"| {r['R@1']:.4f} | {r['dR@1_points']:+.2f} | {r['R@1_balanced']:.4f} "
                   f"| {r['dR@1_balanced_points']:+.2f} | {r['mean_cosine_to_pytorch_fp32']:.5f} |")
    k = doc["config"].get("topk")
    if k and f"top{k}_vs_pytorch_fp32" in next(iter(doc["quality"].values())):
        out += ["", f"Top-{k} agreement per query (every image of the split queries the others): the share of "
                "queries whose top-k is the same set / the same order / the same up to near-ties (each returned "
                "neighbour scores within 1e-3 cosine of the reference's at that rank, scored by the reference). "
                "Score error: |engine − PyTorch fp32| of every pairwise cosine; the last column is the share of "
                f"queries whose PyTorch fp32 top-{k} ends (rank {k} vs {k + 1}) closer than that p90 error: the "
                "queries an engine with that error cannot be expected to keep.", "",
                "| engine | vs PyTorch fp32: set / order / ties | vs OpenVINO fp32: set / order / ties | same top-1 "
                f"| score error p50 / p90 | queries whose top-{k} gap < p90 error |",
                "|---|---|---|---|---|---|"]
        fmt = lambda a: f"{a['same_set']:.1%} / {a['same_order']:.1%} / {a['within_ties']:.1%}" if a else "–"  # noqa: E731
        for e, q in doc["quality"].items():
            ref = q.get(f"top{k}_vs_pytorch_fp32") or {}
            extra = (f" {ref['same_top1']:.1%} | {ref['score_error_p50']:.1e} / {ref['score_error_p90']:.1e} | "
                     f"{ref['ref_gap_below_p90_error']:.1%} |" if "same_top1" in ref else " – | – | – |")
            out.append(f"| {LABELS[e]} | {fmt(ref)} | {fmt(q.get(f'top{k}_vs_openvino_fp32'))} |" + extra)
    rec = doc.get("recheck") or {}
    if rec:
        ks = list(next(iter(rec.values()))["by_k"])
        out += ["", "fp32 recheck (`medsim search --precision bf16|int8` against an index built at fp32): queries "
                "whose "
                "k-th and (k+1)-th hits are closer than the export's margin (calibrated on the validation split) "
                "are embedded again in fp32. Per k: the share of this split's queries with fp32's top-k set "
                "without → with the recheck, and the share rechecked.", "",
                "| engine | margin (method, calibration images) | "
                + " | ".join(f"k={k}: same set → rechecked (share)" for k in ks) + " |",
                "|---|---|" + "---|" * len(ks)]
        for e, r in rec.items():
            cells = [f"{v['same_set']:.1%} → {v['same_set_rechecked']:.1%} ({v['recheck_share']:.1%})"
                     for v in r["by_k"].values()]
            out.append(f"| {LABELS[e]} | {r['margin']:.2g} ({r['method']}, {r['calibration_images']}) | "
                       + " | ".join(cells) + " |")
    pipe = doc.get("search_pipelines")
    if pipe:
        names = {"openvino_bf16_recheck": "OpenVINO bf16 + fp32 recheck"}
        out += ["", f"Whole search of the split's {pipe['queries']} queries (embedding at batch {pipe['batch']} + "
                f"top-{pipe['k']} of the fp32 index, the recheck's fp32 passes included; medians of "
                f"{pipe['rounds']} interleaved rounds; the recheck re-embedded {pipe['rechecked']} queries):", "",
                "| pipeline | queries/s | × PyTorch fp32 |", "|---|---|---|"]
        for p, v in pipe["img_per_s_median"].items():
            out.append(f"| {names.get(p, LABELS.get(p, p))} | {v:.1f} | {pipe['ratio_vs_pytorch_fp32'][p]:.2f} |")
    for e, why in doc.get("engines_skipped", {}).items():
        out.append(f"\n{LABELS[e]}: not run ({why}).")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
