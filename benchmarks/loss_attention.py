"""Loss-based attention (Shi et al., TIP 2021) vs MIL pooling (mean / attention / gated, Ilse et al. 2018) in the same
architecture on real dermoscopy: classification, retrieval and patch precision/recall against the lesion masks.

All runs share one lesion-grouped split of a class-stratified HAM10000 subset and one training seed; they differ
only in the pooling (and the loss: the MIL baselines train with cross-entropy alone, γ_max = 0). Budget: a 2-core
CPU, ~25 min for the whole table (see ``--max-items``, ``--epochs``, ``--image-size``).

    python benchmarks/loss_attention.py --dataset-dir ../shared/data/ham10000 --out benchmarks/results/loss_attention

Patch rule (the paper's Sec. "Experiments for Image Patch Interpretability", with the lesion mask for the box):
a patch is *lesion* if ≥ 50 % of its footprint (the 9×9 stride-4 patch conv's window mapped to input pixels
through the trunk stride, :meth:`LossAttentionNet.patch_footprint_fraction`) is lesion; *selected* if its weight is
> 0 (loss-based attention) or ≥ 1/M (attention / gated / mean pooling, whose softmax weights are never 0: the
patches weighted at least uniformly; mean pooling selects all); *correct* if lesion and its own patch logits
predict the image's class. Precision = correct / selected, recall = correct / lesion, pooled over all test
patches. ``lesion-only`` drops the class condition.

Writes ``<out>.json`` and ``<out>.md``; keeps the loss-attention run as ``<keep>/lossattn`` and the best MIL run
(test balanced accuracy) as ``<keep>/lossattn_<pooling>``.
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
from pathlib import Path

import numpy as np

from medsim.data.splits import copy_split  # noqa: E402
from ham_recipe import common_overrides, recipe_parser, rerender  # benchmarks/ham_recipe.py: the shared HAM10000 recipe

METHODS = {  # name -> (bundle variant, pooling)
    "loss-attention": (None, "loss"),
    "mean": ("mean", "mean"),
    "attention": ("attention_mil", "attention"),
    "gated": ("gated_mil", "gated"),
    "loss-attention (capsule)": ("capsule", "loss"),
}
PAPER = {  # Table IV, Tiny ImageNet, ResNet18 backbone: accuracy, patch precision, recall, F-score (%)
    "mean": (58.79, 81.67, 14.06, 23.99), "attention": (63.22, 84.18, 19.24, 31.32),
    "gated": (61.82, 84.12, 17.33, 28.74), "loss-attention": (64.05, 82.69, 30.71, 44.79),
    "loss-attention (capsule)": (61.58, 81.35, 32.41, 46.35)}


def _test_items(run: Path) -> list[dict]:
    from medsim.data.splits import load_split  # joins split.local.json's image/mask paths (absolute)

    return load_split(run / "split.json")["test"]


def evaluate_patches(run: Path, batch: int = 64) -> dict:
    """Classification (accuracy, balanced accuracy, macro-F1) and patch precision/recall of a run's best.pt."""
    import torch
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from medsim.data.transforms import rgb2d_transforms
    from medsim.export.run import load_run

    lr = load_run(run)
    net = lr.network
    items = [it for it in _test_items(run) if "mask" in it]
    tf = rgb2d_transforms(lr.image_size, train=False, with_mask=True)
    preds, labels = [], []
    counts = {k: 0 for k in ("selected", "lesion", "correct", "selected_lesion", "patches")}
    with torch.no_grad():
        for i in range(0, len(items), batch):
            data = [tf(dict(it)) for it in items[i:i + batch]]
            x = torch.stack([d["image"] for d in data])
            mask = torch.stack([d["mask"] for d in data])
            y = torch.tensor([int(it["label"]) for it in items[i:i + batch]])
            out = net(x)
            w, m = out["patch_weights"], out["patch_weights"].shape[1]
            sel = w > 0 if net.pooling_name == "loss" else w >= (1.0 / m) * (1 - 1e-5)
            lesion = net.patch_footprint_fraction(mask) >= 0.5
            right = out["patch_logits"].argmax(-1) == y[:, None]
            counts["selected"] += int(sel.sum())
            counts["lesion"] += int(lesion.sum())
            counts["correct"] += int((sel & lesion & right).sum())
            counts["selected_lesion"] += int((sel & lesion).sum())
            counts["patches"] += int(w.numel())
            preds.append(out["logits"].argmax(1))
            labels.append(y)
    p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()

    def prf(num: int, sel: int, pos: int) -> dict:
        pr, rc = num / max(sel, 1), num / max(pos, 1)
        return {"precision": pr, "recall": rc, "f1": 2 * pr * rc / max(pr + rc, 1e-12)}

    return {"n_test": len(y), "accuracy": float((p == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, p)),
            "macro_f1": float(f1_score(y, p, average="macro")), "patches_per_image": counts["patches"] / len(y),
            "selected_per_image": counts["selected"] / len(y), "lesion_patch_rate": counts["lesion"] / counts["patches"],
            "patch": prf(counts["correct"], counts["selected"], counts["lesion"]),
            "patch_lesion_only": prf(counts["selected_lesion"], counts["selected"], counts["lesion"]), "counts": counts}


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__, name="loss_attention", work="runs/bench_lossattn", epochs=6, backbone="resnet10",
                       widen_factor=0.25, threads=1, report_from=True)
    ap.add_argument("--keep", default="runs/bench_attn", help="where the loss-attention and best MIL runs are copied")
    ap.add_argument("--split-from", default=None, help="a split.json to reuse (e.g. the DSL benchmark's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if rerender(args, report):
        return 0
    from medsim.engines.workflow import train_bundle

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    common = common_overrides(args, seed=args.seed)
    shared_split = Path(args.split_from) if args.split_from else None
    runs = []
    t_all = time.perf_counter()
    for name in args.methods:
        variant, pooling = METHODS[name]
        out = work / (variant or "loss")
        out.mkdir(parents=True, exist_ok=True)
        if shared_split is not None:
            copy_split(shared_split, out / "split.json")  # + split.local.json (paths)
        t0 = time.perf_counter()
        res = train_bundle("bundles/derm_lossattn", variant=variant, dataset_dir=args.dataset_dir, output_dir=str(out),
                           overrides=common)
        wall = time.perf_counter() - t0
        shared_split = shared_split or out / "split.json"
        ev = evaluate_patches(out)
        history = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append({"method": name, "variant": variant, "pooling": pooling, "run_dir": str(out), "wall_s": round(wall, 1),
                     "test": {"R@1": res["R@1"], "nmi": res["nmi"], **ev}, "epochs": history})
        print(f"[{time.perf_counter() - t_all:7.0f}s] {name:<26} acc {ev['accuracy']:.4f} bal {ev['balanced_accuracy']:.4f} "
              f"R@1 {res['R@1']:.4f} patch F {ev['patch']['f1']:.4f} ({wall:.0f} s)", flush=True)
        # results after every run: an interrupted benchmark keeps the finished rows
        doc = _write(args, argv, runs, Path(shared_split), time.perf_counter() - t_all)
    print(report(doc))
    return 0


def _write(args: argparse.Namespace, argv: list[str] | None, runs: list[dict], split: Path, total_s: float) -> dict:
    kept = _keep(runs, Path(args.keep))
    split_meta = json.loads(split.read_text())["meta"]
    doc = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "config": vars(args), "machine": {"python": platform.python_version(), "cores": os.cpu_count()},
           "split": {"by": split_meta["by"], "counts": split_meta["counts"], "classes": split_meta["classes"]},
           "total_s": round(total_s, 1), "kept": kept, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(report(doc))
    return doc


def _keep(runs: list[dict], keep: Path) -> dict[str, str]:
    """Copy the loss-attention run to ``keep/lossattn`` and the best MIL run to ``keep/lossattn_<pooling>``."""
    kept = {}
    mil = [r for r in runs if r["pooling"] != "loss"]
    chosen = [r for r in runs if r["method"] == "loss-attention"]
    if mil:
        chosen.append(max(mil, key=lambda r: r["test"]["balanced_accuracy"]))
    for pooling in ("mean", "attention", "gated"):  # a MIL run kept earlier that is no longer the best
        if not any(r["pooling"] == pooling for r in chosen):
            shutil.rmtree(keep / f"lossattn_{pooling}", ignore_errors=True)
    for r in chosen:
        dst = keep / ("lossattn" if r["pooling"] == "loss" else f"lossattn_{r['pooling']}")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(r["run_dir"], dst, ignore=shutil.ignore_patterns("tensorboard"))
        kept[r["method"]] = str(dst)
    return kept


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def report(doc: dict) -> str:
    runs, c = doc["runs"], doc["config"]
    lines = ["# Loss-based attention vs MIL pooling on HAM10000 (CPU budget run)", "",
             f"Command: `nice -n 5 {doc['command']}`", "",
             f"Data: class-stratified, lesion-grouped subset of {c['max_items']} HAM10000 images, split by "
             f"{doc['split']['by']}: {doc['split']['counts']} (train/val/test), {c['image_size']}×{c['image_size']} px. "
             f"Model: bundles/derm_lossattn — {c['backbone']} (width ×{c['widen_factor']}) cut after layer3, max-pooling removed, only the stem "
             f"keeps stride 2 (32×32 trunk features), 9×9 stride-4 patch conv + 1×1 conv (128 channels) → 6×6 = 36 "
             f"patches, classifier shared by patches and image. {c['epochs']} epochs, Adam 5e-4, seed {c['seed']}; "
             f"test metrics of the checkpoint with the best validation balanced accuracy (the bundle's model selection). "
             f"torch threads: {c['threads']}. Loss-attention: ξ = 0.1, γ_max = 0.1 ramped up over the first 40 % of the epochs; MIL baselines: "
             f"cross-entropy only. Total {doc['total_s'] / 60:.1f} min on {doc['machine']['cores']} CPU cores (shared with "
             f"other jobs: wall times are indicative only)."
             + (f" Split reused from `{c['split_from']}`." if c.get("split_from") else ""), "",
             "| method | accuracy | balanced acc. | macro-F1 | R@1 | patch precision | patch recall | patch F | "
             "lesion-only P / R / F | selected / image | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t = r["test"]
        lo = t["patch_lesion_only"]
        lines.append(f"| {r['method']} | {_pct(t['accuracy'])} | {_pct(t['balanced_accuracy'])} | {_pct(t['macro_f1'])} | "
                     f"{_pct(t['R@1'])} | {_pct(t['patch']['precision'])} | {_pct(t['patch']['recall'])} | "
                     f"{_pct(t['patch']['f1'])} | {_pct(lo['precision'])} / {_pct(lo['recall'])} / {_pct(lo['f1'])} | "
                     f"{t['selected_per_image']:.1f} / {t['patches_per_image']:.0f} | {r['wall_s']:.0f} |")
    rate = np.mean([r["test"]["lesion_patch_rate"] for r in runs])
    lines += ["", f"All numbers in %, {runs[0]['test']['n_test']} test images (all have masks). "
              f"{100 * rate:.1f} % of all patches are lesion patches (≥ 50 % of the footprint inside the mask): "
              "HAM10000 lesions fill much of the image, so selecting every patch already gives a lesion-only precision "
              "of that rate.", "", "Patch rule: see the script's docstring (selected = weight > 0 for loss-attention, "
              "≥ 1/M for the softmax poolings; correct = lesion patch whose own logits predict the image's class).", ""]
    lines += _versus_paper(runs)
    if doc.get("kept"):
        lines += ["", "Kept run directories: " + ", ".join(f"{m} → `{p}`" for m, p in doc["kept"].items()) + "."]
    return "\n".join(lines) + "\n"


def _versus_paper(runs: list[dict]) -> list[str]:
    by = {r["method"]: r["test"] for r in runs}
    la = by.get("loss-attention")
    mil = {m: t for m, t in by.items() if m in ("mean", "attention", "gated")}
    if la is None or not mil:
        return []
    lines = ["## Against the paper (Table IV: Tiny ImageNet, ResNet18)", "",
             "| method | paper acc. | paper P / R / F | here acc. | here P / R / F |", "|---|---|---|---|---|"]
    for m, t in by.items():
        pa = PAPER.get(m)
        if pa:
            lines.append(f"| {m} | {pa[0]:.2f} | {pa[1]:.2f} / {pa[2]:.2f} / {pa[3]:.2f} | {_pct(t['accuracy'])} | "
                         f"{_pct(t['patch']['precision'])} / {_pct(t['patch']['recall'])} / {_pct(t['patch']['f1'])} |")
    n = la["n_test"]
    lines.append("")

    def claim(label: str, get, noise: bool) -> str:
        best = max(mil, key=lambda m: get(mil[m]))
        diff = get(la) - get(mil[best])
        se = 2 * np.sqrt(get(la) * (1 - get(la)) / n)  # 2 binomial standard errors of one run's proportion
        ok = "agrees" if diff > 0 else "ties" if diff == 0 else "disagrees"
        tail = (f"; the gap ({100 * diff:+.2f}) is {'within' if abs(diff) < se else 'beyond'} ±{100 * se:.1f} "
                f"(2 SE over {n} test images, one seed)") if noise else ""
        return (f"- {label}: loss-attention {_pct(get(la))} vs best MIL pooling ({best}) {_pct(get(mil[best]))} — "
                f"**{ok}** (the paper: loss-attention best){tail}.")

    lines += [claim("Accuracy", lambda t: t["accuracy"], True),
              claim("Balanced accuracy", lambda t: t["balanced_accuracy"], False),
              claim("Patch F-score", lambda t: t["patch"]["f1"], False),
              claim("Patch recall", lambda t: t["patch"]["recall"], False),
              claim("Patch precision", lambda t: t["patch"]["precision"], False)]
    att = [m for m in ("attention", "gated") if m in mil]
    if "mean" in mil and att:
        better = all(mil[m]["accuracy"] > mil["mean"]["accuracy"] for m in att)
        accs = ", ".join(f"{m} {_pct(mil[m]['accuracy'])}" for m in att)
        lines.append(f"- Attention / gated vs mean pooling accuracy: {accs} vs mean {_pct(mil['mean']['accuracy'])} — "
                     f"{'like' if better else 'unlike'} Tiny ImageNet (where both beat mean pooling; on COCO they fell "
                     "behind it).")
    lines.append(f"- Patches selected: loss-attention keeps {la['selected_per_image']:.1f} of "
                 f"{la['patches_per_image']:.0f} per image (weight > 0 after ξ); "
                 + ", ".join(f"{m} {t['selected_per_image']:.1f}" for m, t in mil.items()) + " (weight ≥ 1/M).")
    lines += ["", "## Why this setting can differ from the paper", "",
              "- Training length: a few epochs here against 200 in the paper. Eq. 5 removes a patch only when its "
              "logit norm falls below ξ = 10 % of the average patch's; the patch logits must first become sparse, "
              "which the regulariser (ramped up over 80 epochs in the paper) drives slowly.",
              "- Objects: Tiny ImageNet boxes and COCO objects cover part of the image; HAM10000 lesions are large and "
              f"centred ({100 * la['lesion_patch_rate']:.0f} % of the patches are lesion patches). A method that keeps "
              "most patches then has lesion-only precision near that base rate and recall near 100 %, one that keeps a "
              "few has high precision and low recall: "
              + "; ".join(f"{m} keeps {t['selected_per_image']:.1f} patches, lesion-only precision "
                          f"{_pct(t['patch_lesion_only']['precision'])}" for m, t in by.items())
              + ". Precision / recall here mostly rank how many patches a method keeps; the F-scores end up close.",
              "- \"Correct\" needs the patch's own logits to name the image's class; with 7 imbalanced, "
              "look-alike diagnoses and a small 64 px network, patch-level class accuracy is low, which caps "
              "precision and recall for every method (the lesion-only columns drop this condition).",
              "- Protocol: one seed and ~480 test images (accuracy differences of a few points are noise); Adam 5e-4 "
              "and class-balanced batches for every method (the paper: SGD for loss-attention / attention / gated, "
              "Adam for mean pooling); the checkpoint is chosen on validation balanced accuracy; a resnet "
              "trunk cut after layer3 at width ×0.25 instead of the full ResNet18 with 512-channel patch convs.",
              "- Accuracy vs balanced accuracy: 67 % of HAM10000 images are nevi. With class-balanced batches and "
              "selection on balanced accuracy the kept checkpoints predict the rare classes more often, which costs "
              "plain accuracy (the paper reports accuracy on balanced Tiny ImageNet / COCO); an earlier run of this "
              "script that selected on validation NMI kept checkpoints with 52–67 % accuracy but 41–50 % balanced "
              "accuracy."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
