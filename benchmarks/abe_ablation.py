"""ABE-M with and without the divergence loss (Kim et al., ECCV 2018, Table 2 / Fig. 5) on real dermoscopy.

Trains the ``isic_abe`` bundle (M learners, divergence loss) and its ``nodiv`` variant on the same lesion-grouped
HAM10000 subset as ``dsl_table1.py`` (3000 images, split seed 0, 64 px, resnet18 width ×0.5), for several
training seeds. For the checkpoint with the best validation NMI, on the TEST split:

- ensemble R@1/2/4/8, NMI, MAP@R (the concatenated, unit-norm embedding);
- each learner alone: R@1/2/4/8 and MAP@R of its D/M-dim slice, re-normalised (= its learner embedding);
- how different the learners are: mean cosine similarity of two learners' embeddings of the same image (the
  paper's "self pairs", Fig. 5), and of two learners' attention masks of the same image (full per-channel masks,
  flattened; plain cosine and centred/Pearson, since sigmoid masks are all positive).

    python benchmarks/abe_ablation.py --dataset-dir ../shared/data/ham10000 --out benchmarks/results/abe_ablation

Writes ``<out>.json`` (every run, every epoch record, every learner) and ``<out>.md``. Seed-0 run directories are
copied to ``<save-dir>/abe`` and ``<save-dir>/abe_nodiv`` (for the localization comparison).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from medsim.data.splits import copy_split  # noqa: E402
from ham_recipe import common_overrides, recipe_parser  # benchmarks/ham_recipe.py: the shared HAM10000 recipe

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "isic_abe"
VARIANTS = {"abe": None, "abe_nodiv": "nodiv"}  # run name -> bundle variant
LABELS = {"abe": "ABE-M (with L_div)", "abe_nodiv": "ABE-M without L_div"}


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__, name="abe_ablation", work="runs/bench_abe", epochs=8)
    ap.add_argument("--save-dir", default="runs/bench_attn", help="seed-0 runs are copied here as abe, abe_nodiv")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-learners", type=int, default=4)
    ap.add_argument("--embedding-dim", type=int, default=128)
    ap.add_argument("--reanalyse", action="store_true",
                    help="no training: recompute the test analysis of the runs listed in <out>.json from their "
                         "run directories under --work and rewrite <out>.json/.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.reanalyse:
        return reanalyse(Path(args.out), Path(args.work))

    from medsim.engines.workflow import train_bundle

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    common = common_overrides(args, n_learners=args.n_learners, embedding_dim=args.embedding_dim)
    shared_split = None
    runs = []
    t_all = time.perf_counter()
    for seed in args.seeds:  # seeds outer: a cut-short run still has both variants of its first seeds
        for name, variant in VARIANTS.items():
            out = work / f"{name}_s{seed}"
            out.mkdir(parents=True, exist_ok=True)
            if shared_split is not None:  # every run on the same split
                copy_split(shared_split, out / "split.json")  # + split.local.json (paths)
            t0 = time.perf_counter()
            res = train_bundle(BUNDLE, variant=variant, dataset_dir=args.dataset_dir, output_dir=str(out),
                               overrides={**common, "seed": seed})
            wall = time.perf_counter() - t0
            if shared_split is None:
                shared_split = out / "split.json"
            t1 = time.perf_counter()
            analysis = analyse_run(out)
            history = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
            runs.append({"run": name, "seed": seed, "wall_s": round(wall, 1),
                         "analysis_s": round(time.perf_counter() - t1, 1), "test_from_training": {
                             k: res[k] for k in ("nmi", "R@1", "map_at_r")}, **analysis, "epochs": history})
            e = analysis["ensemble"]
            print(f"[{time.perf_counter() - t_all:7.0f}s] {name:<10} seed {seed}: ensemble R@1 {e['R@1']:.4f} NMI "
                  f"{e['nmi']:.4f}; learners R@1 {[round(x['R@1'], 4) for x in analysis['learners']]}; self-pair "
                  f"cos {analysis['self_pair_cosine']:.3f} ({wall:.0f} s)", flush=True)
            if seed == args.seeds[0]:
                dst = Path(args.save_dir) / name
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(out, dst)
            write_results(args, argv, runs, shared_split, time.perf_counter() - t_all)  # after every run
    print(report(json.loads(Path(args.out).with_suffix(".json").read_text())))
    return 0


def reanalyse(out: Path, work: Path) -> int:
    doc = json.loads(out.with_suffix(".json").read_text())
    for r in doc["runs"]:
        r.update(analyse_run(work / f"{r['run']}_s{r['seed']}"))
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(report(doc))
    print(report(doc))
    return 0


def write_results(args: argparse.Namespace, argv: list[str] | None, runs: list[dict], split_file: Path,
                  total_s: float) -> None:
    """``<out>.json`` and ``<out>.md`` for the runs so far."""
    split_meta = json.loads(Path(split_file).read_text())["meta"]
    doc = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "config": vars(args), "machine": {"python": platform.python_version(), "cpu": platform.processor(),
                                              "cores": os.cpu_count()},
           "split": {"by": split_meta["by"], "counts": split_meta["counts"], "classes": split_meta["classes"]},
           "total_s": round(total_s, 1), "runs": runs,
           "context": _context(Path(args.out).with_name("dsl_table1.json"), split_meta["counts"])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(report(doc))


def analyse_run(run_dir: Path) -> dict[str, Any]:
    """Test-split metrics of the run's best checkpoint: the ensemble, each learner alone, learner similarity."""
    import torch
    from monai.data import DataLoader

    from medsim.data.datasets import make_dataset
    from medsim.export.run import load_run
    from medsim.metrics.retrieval import evaluate_embeddings, map_at_r_precision_at_1, recall_at_k, usable_ks

    run = load_run(run_dir / "best.pt")
    net = run.network
    loader = DataLoader(make_dataset(run.datalists["test"], run.transform, progress=False),
                        batch_size=run.eval_batch_size, num_workers=0)
    emb, learners, masks, labels = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            x = batch["image"]
            out = net(x)
            emb.append(out["embedding"])
            learners.append(out["learner_embeddings"])
            masks.append(net.learner_masks(net.spatial(x)).flatten(2))  # (B, M, C·h·w)
            labels.append(torch.as_tensor(batch["label"]))
    emb_t, le, mk = torch.cat(emb), torch.cat(learners), torch.cat(masks)
    y = torch.cat(labels).numpy()
    ks = usable_ks(len(y))
    ensemble = evaluate_embeddings(emb_t.numpy(), y, ks=ks)
    ensemble["macro_R@1"] = round(macro_recall_at_1(emb_t.numpy(), y), 4)
    per_learner = []
    for m in range(le.shape[1]):
        sl = torch.nn.functional.normalize(emb_t[:, m * le.shape[2]:(m + 1) * le.shape[2]], dim=1).numpy()
        r = {k: round(v, 4) for k, v in recall_at_k(sl, y, ks).items()}
        r["map_at_r"] = round(map_at_r_precision_at_1(sl, y)["map_at_r"], 4)
        r["macro_R@1"] = round(macro_recall_at_1(sl, y), 4)
        r["mask_mean"] = round(float(mk[:, m].mean()), 4)
        per_learner.append(r)
    pairs = list(combinations(range(le.shape[1]), 2))
    centred = mk - mk.mean(-1, keepdim=True)

    def mean_cos(t: torch.Tensor) -> float:
        t = torch.nn.functional.normalize(t, dim=-1)
        return float(np.mean([(t[:, p] * t[:, q]).sum(-1).mean() for p, q in pairs])) if pairs else float("nan")

    return {"ensemble": ensemble, "learners": per_learner, "self_pair_cosine": round(mean_cos(le), 4),
            "mask_cosine": round(mean_cos(mk), 4), "mask_pearson": round(mean_cos(centred), 4),
            "test_images": int(len(y))}


def macro_recall_at_1(x: np.ndarray, y: np.ndarray) -> float:
    """R@1 per class (leave-one-out, cosine), averaged over classes: HAM10000 is 67 % nevi, and plain R@1 is
    dominated by nevus queries finding nevi."""
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    hit = y[sim.argmax(1)] == y
    return float(np.mean([hit[y == c].mean() for c in np.unique(y)]))


def _context(dsl_json: Path, counts: dict) -> dict[str, Any] | None:
    """Single-learner margin-loss numbers of dsl_table1 when it ran on the same split (same counts)."""
    if not dsl_json.is_file():
        return None
    doc = json.loads(dsl_json.read_text())
    if doc.get("split", {}).get("counts") != counts:
        return None
    rs = [r for r in doc["runs"] if r["method"] == "MML K=1 (margin)"]
    if not rs:
        return None
    return {"method": "DSL Embedder, margin loss, one learner (dsl_table1 'MML K=1 (margin)')",
            "epochs": doc["config"]["epochs"], "seeds": [r["seed"] for r in rs],
            **{k: [r["test"][k] for r in rs] for k in ("nmi", "R@1", "R@2", "R@4", "R@8", "map_at_r")}}


def _ms(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def report(doc: dict) -> str:
    runs, c = doc["runs"], doc["config"]
    names = list(dict.fromkeys(r["run"] for r in runs))
    ks = [k for k in ("R@1", "R@2", "R@4", "R@8") if k in runs[0]["ensemble"]]
    lines = ["# ABE-M: ensemble vs individual learners, with and without the divergence loss (HAM10000, CPU)", "",
             f"Command: `nice -n 5 {doc['command']}`", "",
             f"Data: class-stratified, lesion-grouped subset of {c['max_items']} HAM10000 images (the dsl_table1 "
             f"recipe), split by {doc['split']['by']}: {doc['split']['counts']} (train/val/test), "
             f"{len(doc['split']['classes'])} classes. {c['image_size']}×{c['image_size']} px, {c['backbone']} "
             f"(width ×{c['widen_factor']}): S = trunk to layer3, shared 2-block attention trunk, one 1×1 conv mask "
             f"per learner, G = layer4 + GAP + linear. M = {c['n_learners']} learners × "
             f"{c['embedding_dim'] // c['n_learners']} dims = {c['embedding_dim']}-d ensemble; one margin loss per "
             f"learner; m_div = 1, λ_div = 1 (or 0). {c['epochs']} epochs, Adam 5e-4, batch 32, seeds "
             f"{sorted({r['seed'] for r in runs})} (of {c['seeds']} planned). "
             f"All metrics on the TEST split ({runs[0]['test_images']} images, leave-one-out retrieval) with the "
             f"checkpoint of best validation NMI. Total {doc['total_s'] / 60:.1f} min on {doc['machine']['cores']} "
             f"CPU cores (torch threads: {c.get('threads') or 'default'}; other jobs shared the cores).", "",
             "## Ensemble vs learners (mean ± std over seeds, %)", "",
             "| run | embedding | " + " | ".join(ks) + " | NMI | MAP@R | macro R@1 |",
             "|---|---|" + "---|" * (len(ks) + 3)]
    for n in names:
        rs = [r for r in runs if r["run"] == n]
        lines.append(f"| {LABELS[n]} | ensemble ({c['embedding_dim']}-d) | "
                     + " | ".join(_ms([r["ensemble"][k] for r in rs]) for k in ks)
                     + f" | {_ms([r['ensemble']['nmi'] for r in rs])} | {_ms([r['ensemble']['map_at_r'] for r in rs])} | "
                     f"{_ms([r['ensemble'].get('macro_R@1', np.nan) for r in rs])} |")
        lines.append(f"| {LABELS[n]} | one learner ({c['embedding_dim'] // c['n_learners']}-d), mean of M | "
                     + " | ".join(_ms([np.mean([x[k] for x in r["learners"]]) for r in rs]) for k in ks)
                     + f" | – | {_ms([np.mean([x['map_at_r'] for x in r['learners']]) for r in rs])} | "
                     f"{_ms([np.mean([x.get('macro_R@1', np.nan) for x in r['learners']]) for r in rs])} |")
        lines.append(f"| {LABELS[n]} | best single learner | "
                     + " | ".join(_ms([max(x[k] for x in r["learners"]) for r in rs]) for k in ks) + " | – | – | – |")
    ctx = doc.get("context")
    if ctx:
        lines.append(f"| context: {ctx['method']}, {ctx['epochs']} epochs | 128-d | "
                     + " | ".join(_ms(ctx[k]) for k in ks) + f" | {_ms(ctx['nmi'])} | {_ms(ctx['map_at_r'])} | – |")
    lines += ["", "## How different are the learners? (test images, mean over learner pairs and seeds)", "",
              "| run | ensemble R@1 − mean learner R@1 (points) | same for macro R@1 | self-pair embedding cosine | "
              "mask cosine | mask Pearson r | mean mask value per learner | wall time / run (s) |",
              "|---|---|---|---|---|---|---|---|"]
    gains = {}
    for n in names:
        rs = [r for r in runs if r["run"] == n]
        gain = [r["ensemble"]["R@1"] - np.mean([x["R@1"] for x in r["learners"]]) for r in rs]
        gains[n] = float(np.mean(gain))
        macro = [r["ensemble"].get("macro_R@1", np.nan) - np.mean([x.get("macro_R@1", np.nan) for x in r["learners"]])
                 for r in rs]
        means = np.mean([[x["mask_mean"] for x in r["learners"]] for r in rs], axis=0)
        lines.append(f"| {LABELS[n]} | {100 * np.mean(gain):+.2f} ± {100 * np.std(gain):.2f} | "
                     f"{100 * np.mean(macro):+.2f} ± {100 * np.std(macro):.2f} | "
                     f"{np.mean([r['self_pair_cosine'] for r in rs]):.3f} | {np.mean([r['mask_cosine'] for r in rs]):.3f} | "
                     f"{np.mean([r['mask_pearson'] for r in rs]):.3f} | {', '.join(f'{v:.2f}' for v in means)} | "
                     f"{np.mean([r['wall_s'] for r in rs]):.0f} |")
    lines += ["", "## Per seed and learner (test R@1, %)", "",
              "| run | seed | ensemble | " + " | ".join(f"learner {m}" for m in range(c["n_learners"]))
              + " | best epoch (val NMI) | self-pair cos |", "|---|---|---|" + "---|" * (c["n_learners"] + 2)]
    for r in runs:
        best = max(r["epochs"], key=lambda e: e.get("val_nmi", -1))
        lines.append(f"| {LABELS[r['run']]} | {r['seed']} | {100 * r['ensemble']['R@1']:.2f} | "
                     + " | ".join(f"{100 * x['R@1']:.2f}" for x in r["learners"])
                     + f" | {best['epoch']} ({best.get('val_nmi', float('nan')):.4f}) | {r['self_pair_cosine']:.3f} |")
    if {"abe", "abe_nodiv"} <= set(gains):
        g, g0 = 100 * gains["abe"], 100 * gains["abe_nodiv"]
        gain_holds = g > g0 + 1.0 and g > 1.0  # criterion: > 1 point, and > 1 point above the ablation's gain

        def mean_of(run: str, f: Any) -> float:
            return float(np.mean([f(r) for r in runs if r["run"] == run]))

        cos, cos0 = (mean_of(n, lambda r: r["self_pair_cosine"]) for n in ("abe", "abe_nodiv"))
        ens, ens0 = (100 * mean_of(n, lambda r: r["ensemble"]["R@1"]) for n in ("abe", "abe_nodiv"))
        lrn, lrn0 = (100 * mean_of(n, lambda r: np.mean([x["R@1"] for x in r["learners"]])) for n in ("abe", "abe_nodiv"))
        if gain_holds and ens > ens0:
            verdict = ("**The finding holds**: only with the divergence loss is the ensemble clearly better than its "
                       "learners, and the ensemble with it beats the ensemble without it.")
        elif gain_holds:
            verdict = (f"**The finding holds only in part.** The mechanism reproduces — without L_div the learners "
                       f"collapse (self-pair cosine {cos0:.2f}) and the ensemble equals a learner; with it they differ "
                       f"(cosine {cos:.2f}) and the ensemble beats its learners by {g:.1f} points — but the gain is "
                       f"small, not the paper's large margin, and the divergence loss does not pay off: its learners "
                       f"lose {lrn0 - lrn:.1f} points R@1 against the collapsed ones, more than the ensemble gains, so "
                       f"the ABE ensemble ({ens:.1f}) stays below the ensemble without L_div ({ens0:.1f}).")
        else:
            verdict = ("**The finding does not hold here**: the ensemble's gain over its learners is not clearly "
                       "larger with the divergence loss (criterion: > 1 point, and > 1 point above the ablation's).")
        lines += ["", "## The paper's finding", "",
                  "Paper (CARS-196, Table 2 / Fig. 5): with the divergence loss the ensemble is far better than each "
                  "learner and self pairs have low cosine; without it the learners collapse onto one embedding "
                  "(self-pair cosine ≈ 1) and the ensemble is no better than a learner — and worse than ABE with it.",
                  "",
                  f"Here: ensemble − mean learner R@1 is {g:+.2f} points with L_div and {g0:+.2f} without; self-pair "
                  f"cosine {cos:.3f} vs {cos0:.3f}; ensemble R@1 {ens:.2f} vs {ens0:.2f}; mean learner R@1 "
                  f"{lrn:.2f} vs {lrn0:.2f}. " + verdict]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
