"""Transfer (issue 11): the supervised HAM10000 models fine-tuned from SSL weights vs from random init, same budget.

For each model — isic_dsl's DSL (default), its margin (MML K=1) and classifier variants, and derm_lossattn — and each
start — random init and ``-o pretrained=<SSL run>`` (the SSL run's trunk; heads fresh) — one training run on the
shared HAM10000 recipe (same 3000-image subset and lesion-grouped split as the SSL pretraining, whose test lesions it
never saw). Reports test NMI, R@1, MAP@R, balanced accuracy (models with logits) and, for derm_lossattn, the
localization Dice / pointing of its exported attention on the HAM lesion masks (``medsim localize``'s scoring).

    python benchmarks/ssl_transfer.py --dataset-dir ../shared/data/ham10000 --pretrained runs/ssl/byol \
        --out benchmarks/results/ssl_transfer
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ham_recipe import command_line, common_overrides, recipe_parser, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (bundle, variant, extra overrides)
    "DSL": ("isic_dsl", None, {}),
    "margin (MML K=1)": ("isic_dsl", "margin", {}),
    "classifier": ("isic_dsl", "classifier", {}),
    "contrastive": ("isic_dsl", "contrastive", {}),
    "triplet": ("isic_dsl", "triplet", {}),
    "MML K=2": ("isic_dsl", "mml", {"k": 2}),
    "MML K=4": ("isic_dsl", "mml", {"k": 4}),
    "loss attention": ("derm_lossattn", None, {}),
}
KEYS = ("nmi", "R@1", "map_at_r", "balanced_accuracy")


def localization(run: Path, work: Path) -> dict[str, float]:
    """Dice / IoU / pointing of the run's exported attention on its test images' lesion masks."""
    from medsim.data.splits import load_split
    from medsim.deploy.tasks import localize_images
    from medsim.export.pipeline import export_run

    export = work / "export"
    export_run(run, export, opt_batch=8)
    items = [it for it in load_split(run / "split.json")["test"] if "mask" in it]
    res = localize_images(export, [it["image"] for it in items], work / "loc", masks=[it["mask"] for it in items],
                          progress=False)
    return {k: float(res[k]) for k in ("dice", "iou", "pointing") if k in res}


def _slug(name: str) -> str:
    """Run-folder prefix of a model: ``DSL`` -> ``dsl``, ``MML K=2`` -> ``mml-k2``, ``loss attention`` -> ``loss``."""
    if name.startswith("MML K=") and "margin" not in name:
        return "mml-k" + name.split("=")[1]
    return name.split()[0].lower()


def collect(work_dirs: list[Path]) -> list[dict[str, Any]]:
    """Rows of finished runs (``<work>/<model>_<start>/eval_test.json``, written by this script's runs), e.g. of
    several seeds trained into several ``--work`` folders or of a run cut short."""
    prefix = {_slug(name): name for name in MODELS}
    rows = []
    for work in work_dirs:
        for run in sorted(p for p in Path(work).iterdir() if (p / "eval_test.json").is_file()):
            model, start = run.name.rsplit("_", 1)
            res = json.loads((run / "eval_test.json").read_text())
            config = json.loads((run / "config.json").read_text())
            row = {"model": prefix[model], "start": start, "seed": config.get("seed"), "wall_s": float("nan"),
                   "test": {k: float(res[k]) for k in KEYS if k in res}}
            loc = Path(work) / f"{run.name}_loc" / "loc" / "localization.json"
            if loc.is_file():
                summary = json.loads(loc.read_text()).get("summary", {})
                row["test"].update({k: float(summary[k]) for k in ("dice", "iou", "pointing") if k in summary})
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__, name="ssl_transfer", work="runs/ssl_transfer", epochs=8)
    ap.add_argument("--pretrained", required=True, help="the SSL run folder whose trunk the models start from")
    ap.add_argument("--models", nargs="+", default=["DSL", "margin (MML K=1)", "classifier", "loss attention"],
                    choices=list(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--collect", nargs="+", default=None,
                    help="only write the report from the finished runs in these --work folders")
    args = ap.parse_args(argv)
    if args.collect:
        doc = {"command": command_line(argv),
               "config": vars(args), "total_s": float("nan"), "runs": collect([Path(w) for w in args.collect])}
        return write_results(args.out, doc, report)
    from medsim.engines.workflow import train_bundle

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    common = common_overrides(args, seed=args.seed, **{"train#output_handlers#0#_disabled_": True})
    runs: list[dict[str, Any]] = []
    t_all = time.time()
    for name in args.models:
        bundle, variant, extra = MODELS[name]
        for start in ("random", "ssl"):
            out = work / f"{_slug(name)}_{start}"
            ov = {**common, **extra, **({"pretrained": str(Path(args.pretrained).resolve())} if start == "ssl" else {})}
            t0 = time.time()
            res = train_bundle(ROOT / "bundles" / bundle, variant=variant, dataset_dir=args.dataset_dir,
                               output_dir=str(out), overrides=ov)
            row = {"model": name, "start": start, "seed": args.seed, "wall_s": round(time.time() - t0, 1),
                   "test": {k: float(res[k]) for k in KEYS if k in res}}
            if bundle == "derm_lossattn":
                row["test"].update(localization(out, work / f"{out.name}_loc"))
            runs.append(row)
            print(f"[{time.time() - t_all:6.0f}s] {name:<18} {start:<6} " + " ".join(
                f"{k} {v:.4f}" for k, v in row["test"].items()), flush=True)
    doc = {"command": command_line(argv),
           "config": vars(args), "total_s": round(time.time() - t_all, 1), "runs": runs}
    return write_results(args.out, doc, report)


def report(doc: dict) -> str:
    import numpy as np

    c = doc["config"]
    cols = [("nmi", "NMI"), ("R@1", "R@1"), ("map_at_r", "MAP@R"), ("balanced_accuracy", "bal. acc"),
            ("dice", "Dice"), ("pointing", "pointing")]
    runs = doc["runs"]
    lines = ["# Transfer from SSL pretraining on HAM10000", "", f"Command: `{doc['command']}`", "",
             f"Recipe: {c['max_items']}-image class-stratified, lesion-grouped HAM10000 subset (split seed 0), "
             f"{c['image_size']} px, {c['backbone']} ×{c['widen_factor']}, {c['epochs']} epochs; "
             f"`ssl` = trunk from `{Path(c['pretrained']).name}` (`-o pretrained=...`), heads fresh. Test metrics of "
             f"the checkpoint the bundle selects, mean ± std over the seeds listed. All numbers in %.", "",
             "| model | start | seeds | " + " | ".join(h for _, h in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["start"]), []).append(r)

    def cell(rs: list[dict], k: str) -> str:
        vals = [100 * r["test"][k] for r in rs if k in r["test"]]
        if not vals:
            return "-"
        return f"{np.mean(vals):.2f}" + (f" ± {np.std(vals):.2f}" if len(vals) > 1 else "")

    for (model, start), rs in groups.items():
        seeds = ",".join(str(r.get("seed", c.get("seed"))) for r in rs)
        lines.append(f"| {model} | {start} | {seeds} | " + " | ".join(cell(rs, k) for k, _ in cols) + " |")
    lines += ["", "Gain of the SSL start, per seed (percentage points):", "",
              "| model | seed | " + " | ".join(h for _, h in cols) + " |", "|---|---|" + "---|" * len(cols)]
    by = {(r["model"], r["start"], r.get("seed", c.get("seed"))): r["test"] for r in runs}
    for (model, start, seed), b in by.items():
        a = by.get((model, "random", seed))
        if start == "ssl" and a:
            lines.append(f"| {model} | {seed} | " + " | ".join(
                f"{100 * (b[k] - a[k]):+.2f}" if k in a and k in b else "-" for k, _ in cols) + " |")
    return "\n".join(lines + [""] + doc.get("notes", [])) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
