"""Few-label organ segmentation from a pretrained 3-D encoder: random init vs BYOL-3D vs PGL (Xie et al. 2020, Table 2
style) on the 15 CHAOS T2-SPIR MR volumes of ``../shared/data/mr_chaos`` (liver, right kidney, left kidney, spleen).

Split by volume (one patient each), fixed by ``--split-seed``: ``--n-test`` volumes are held back for the Dice test,
the other volumes are the pretraining set (their labels are never read by pretraining) and the first
``max(--n-labelled)`` of them (in the split's order) are the labelled pool; N labelled volumes = the first N of the
pool (nested: the 1-volume set is inside the 2-volume set ...).

1. Pretraining: ``bundles/ct_pgl`` (PGL) and its ``byol3d`` variant (BYOL alone) on the pretraining volumes (MR:
   percentile intensities), through :func:`medsim.engines.workflow.train_bundle`; the bundle splits them again by
   volume for its label-free checkpoint selection (validation loss).
2. Fine-tuning: :class:`medsim.nn.segmentation.ResNetUNet` with the same trunk, its encoder random or loaded from
   the selected pretraining checkpoint; DiceCE on N labelled volumes with the same budget (epochs × steps × batch)
   for every start and every N (:func:`medsim.engines.segmentation.finetune_segmentation`).
3. Test: sliding-window inference on the whole held-back volumes, MONAI ``DiceMetric`` per organ (on the resampled
   grid, ``--pixdim``).

    python benchmarks/pgl_segmentation.py --dataset-dir ../shared/data/mr_chaos \
        --out benchmarks/results/pgl_segmentation

``run_benchmark(...)`` is the same as a function. Writes ``<out>.json`` (every run, every epoch, every volume's Dice;
rewritten after each fine-tuning run, so an interrupted run leaves what it measured) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_pgl"
STARTS = {"random": None, "byol3d": "byol3d", "pgl": "pgl"}  # start name -> pretraining run (None: random init)
LABELS = {"random": "random init", "byol3d": "BYOL-3D", "pgl": "PGL"}

logger = logging.getLogger("pgl_segmentation")


def split_volumes(items: Sequence[dict], n_test: int, n_pool: int, seed: int,
                  rotation: int = 0) -> dict[str, list[dict]]:
    """``{"test", "pretrain", "pool"}`` by volume: a seeded permutation, the last ``n_test`` held back; the pool is
    ``n_pool`` of the rest (a subset of the pretraining volumes): rotation ``r`` takes them from position
    ``r * n_pool`` on, wrapping around, so rotations 0, 1, ... label different volumes of the same split."""
    order = np.random.default_rng(seed).permutation(len(items))
    if n_test < 1 or n_pool < 1 or n_test + n_pool > len(items):
        raise ValueError(f"need 1 <= n_test, 1 <= n_pool, n_test + n_pool <= {len(items)} volumes, got "
                         f"n_test={n_test} n_pool={n_pool}")
    test = [items[i] for i in order[len(items) - n_test:]]
    pretrain = [items[i] for i in order[: len(items) - n_test]]
    first = rotation * n_pool
    pool = [pretrain[(first + i) % len(pretrain)] for i in range(n_pool)]
    return {"test": test, "pretrain": pretrain, "pool": pool}


def _link_folder(items: Sequence[dict], folder: Path) -> Path:
    """A folder of symbolic links to the images of ``items`` (what the pretraining bundle reads: no labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for it in items:
        (folder / Path(it["image"]).name).symlink_to(Path(it["image"]).resolve())
    return folder


def run_benchmark(dataset_dir: str | os.PathLike, out: str | os.PathLike, work: str | os.PathLike, *,
                  n_test: int = 5, n_labelled: Sequence[int] = (1, 2, 4), split_seed: int = 0,
                  pixdim: Sequence[float] = (3.0, 3.0, 6.0), roi_size: Sequence[int] = (64, 64, 32),
                  backbone: str = "resnet18", widen_factor: float = 0.5, cut: str = "layer3",
                  pretrain_epochs: int = 10, pretrain_items: int = 16, pretrain_batch: int = 2,
                  pretrain_lr: float = 2e-4, ft_epochs: int = 10, ft_steps: int = 8, ft_batch: int = 2,
                  ft_lr: float = 1e-3, amp: bool = False, seed: int = 0, starts: Sequence[str] = tuple(STARTS),
                  checkpoint: str = "best.pt", rotations: Sequence[int] = (0,), pool_size: int = 4,
                  command: str = "") -> dict[str, Any]:
    """Pretrain (PGL, BYOL-3D), fine-tune every start on N labelled volumes, test Dice per organ; write
    ``<out>.json`` / ``<out>.md`` and return the JSON document (module docstring).

    ``checkpoint``: which pretraining checkpoint starts the encoder (``best.pt``: selected on the validation loss;
    ``last.pt``: after every epoch). ``starts``: a subset of :data:`STARTS`. A finished pretraining run in ``work``
    is reused (``train_bundle`` resumes it: nothing left to train); only the pretraining that ``starts`` need runs.
    ``rotations``: which labelled sets (:func:`split_volumes` with ``n_pool = max(pool_size, max(n_labelled))``, so
    that runs of a subset of ``n_labelled`` label the same volumes); rotation ``r`` fine-tunes with seed
    ``seed + r``."""
    import torch

    from medsim.data.segmentation import labelled_volumes, segmentation_transforms
    from medsim.engines.segmentation import evaluate_segmentation, finetune_segmentation, load_encoder
    from medsim.engines.workflow import train_bundle
    from medsim.nn.segmentation import ResNetUNet

    dataset_dir, out, work = Path(dataset_dir), Path(out), Path(work)
    names_file = dataset_dir / "label_names.json"
    label_names = {int(k): v for k, v in json.loads(names_file.read_text()).items() if int(k) > 0} \
        if names_file.is_file() else {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
    items = labelled_volumes(dataset_dir)
    pool_size = max(pool_size, *n_labelled)
    parts = split_volumes(items, n_test, pool_size, split_seed)
    vol = lambda it: Path(it["image"]).name.split(".")[0]  # noqa: E731
    doc: dict[str, Any] = {
        "command": command, "host": {"machine": platform.machine(), "threads": torch.get_num_threads(),
                                     "python": platform.python_version(), "torch": torch.__version__},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "data": {"dataset": str(dataset_dir), "n_volumes": len(items), "split_seed": split_seed,
                 "test": [vol(it) for it in parts["test"]], "pretrain": [vol(it) for it in parts["pretrain"]],
                 "labelled_pool": [vol(it) for it in parts["pool"]], "pixdim_mm": list(pixdim),
                 "rotations": {str(r): [vol(it) for it in split_volumes(items, n_test, pool_size, split_seed,
                                                                         r)["pool"]] for r in rotations},
                 "label_names": label_names},
        "settings": {"roi_size": list(roi_size), "backbone": backbone, "widen_factor": widen_factor, "cut": cut,
                     "pretrain": {"epochs": pretrain_epochs, "items_per_epoch": pretrain_items,
                                  "batch_size": pretrain_batch, "learning_rate": pretrain_lr},
                     "finetune": {"epochs": ft_epochs, "steps_per_epoch": ft_steps, "batch_size": ft_batch,
                                  "learning_rate": ft_lr, "loss": "monai DiceCELoss (softmax, one-hot labels)"},
                     "amp_bf16": amp, "seed": seed, "pretrained_checkpoint": checkpoint},
        "pretraining": {}, "runs": []}

    # 1. pretraining, on the pretraining volumes only (no labels read)
    folder = _link_folder(parts["pretrain"], work / "pretrain_volumes")
    overrides = {"intensity": "percentile", "pixdim": list(pixdim), "image_size": list(roi_size),
                 "backbone": backbone, "widen_factor": widen_factor, "cut": cut, "max_epochs": pretrain_epochs,
                 "items_per_epoch": pretrain_items, "batch_size": pretrain_batch, "eval_batch_size": pretrain_batch,
                 "learning_rate": pretrain_lr, "amp": amp, "seed": seed, "split_fractions": [0.8, 0.1, 0.1],
                 "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}
    runs: dict[str, Path] = {}
    for name, variant in (("byol3d", "byol3d"), ("pgl", None)):
        if name not in starts:
            continue
        run_dir = work / name
        t0 = time.time()
        res = train_bundle(BUNDLE, variant=variant, dataset_dir=str(folder), output_dir=str(run_dir),
                           overrides=dict(overrides))
        recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        split = json.loads((run_dir / "split.local.json").read_text())
        doc["pretraining"][name] = {
            "seconds": round(time.time() - t0, 1), "epochs": recs, "test_loss": res,
            "seconds_per_epoch": float(np.median([r["seconds"] for r in recs if "seconds" in r])) if recs else None,
            "ssl_split": {k: [Path(it["image"]).name.split(".")[0] for it in split.get(k, [])]
                          for k in ("training", "validation", "test")}}
        runs[name] = run_dir
        logger.warning("pretrained %s in %.0f s: val_loss %s", name, time.time() - t0,
                       [r.get("val_loss") for r in recs])

    # 2.-3. fine-tuning and test, the same budget for every start and N
    def train_tf() -> Any:
        return segmentation_transforms(roi_size, train=True, pixdim=pixdim, intensity="percentile")

    eval_tf = segmentation_transforms(roi_size, pixdim=pixdim, intensity="percentile")
    for rotation in rotations:
        pool = split_volumes(items, n_test, pool_size, split_seed, rotation)["pool"]
        for n in n_labelled:
            for start in starts:
                run_name = STARTS[start]
                torch.manual_seed(seed + rotation)
                net = ResNetUNet(backbone, out_channels=max(label_names) + 1, cut=cut, widen_factor=widen_factor)
                load_encoder(net, runs[run_name] / checkpoint if run_name else None)
                t0 = time.time()
                hist = finetune_segmentation(net, pool[:n], train_tf(), max_epochs=ft_epochs,
                                             steps_per_epoch=ft_steps, batch_size=ft_batch, learning_rate=ft_lr,
                                             amp=amp, seed=seed + rotation)
                t_train = time.time() - t0
                res = evaluate_segmentation(net, parts["test"], eval_tf, roi_size=roi_size, label_names=label_names,
                                            amp=amp)
                doc["runs"].append({"start": start, "n_labelled": n, "rotation": rotation,
                                    "labelled": [vol(it) for it in pool[:n]],
                                    "dice": res["dice"], "mean_dice": res["mean_dice"],
                                    "per_volume": dict(zip(doc["data"]["test"], res["per_volume"])),
                                    "finetune_epochs": hist, "finetune_seconds": round(t_train, 1),
                                    "test_seconds": round(time.time() - t0 - t_train, 1)})
                logger.warning("rotation %d N=%d %s: mean Dice %.3f %s (%.0f s)", rotation, n, start,
                               res["mean_dice"], {k: round(v, 3) for k, v in res["dice"].items()}, time.time() - t0)
                write(doc, out)
    write(doc, out)
    return doc


def write(doc: dict[str, Any], out: Path) -> None:
    """``<out>.json`` and ``<out>.md`` (the table and the settings; the reading is added by hand)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=float))
    organs = list(doc["data"]["label_names"].values())
    lines = ["# Few-label organ segmentation from a pretrained 3-D encoder: random init vs BYOL-3D vs PGL", "",
             "```", doc["command"], "```", "",
             f"Data: `{doc['data']['dataset']}` ({doc['data']['n_volumes']} volumes), split by volume "
             f"(seed {doc['data']['split_seed']}): test {', '.join(doc['data']['test'])}; pretraining "
             f"{', '.join(doc['data']['pretrain'])}; labelled pool (first N used) "
             f"{', '.join(doc['data']['labelled_pool'])}"
             + "".join(f"; rotation {k}: {', '.join(v)}" for k, v in doc["data"].get("rotations", {}).items())
             + f". Resampled to {doc['data']['pixdim_mm']} mm. Pretrained "
             f"encoders start from each run's `{doc['settings'].get('pretrained_checkpoint', 'best.pt')}`.", "",
             ]
    rotations = sorted({r.get("rotation", 0) for r in doc["runs"]})
    if len(rotations) > 1:
        lines += [f"Mean ± sample sd over the {len(rotations)} labelled-set rotations ({', '.join(map(str, rotations))}"
                  "; each rotation labels other volumes and fine-tunes with another seed):", "",
                  "| N labelled | start | " + " | ".join(organs) + " | mean Dice | runs |",
                  "|---|---|" + "---|" * (len(organs) + 2)]
        for n, start, group in summarize(doc["runs"]):
            cells = [f"{np.mean([r['dice'][o] for r in group]):.3f} ± {_sd([r['dice'][o] for r in group]):.3f}"
                     for o in organs]
            md = [r["mean_dice"] for r in group]
            lines.append(f"| {n} | {LABELS[start]} | " + " | ".join(cells)
                         + f" | **{np.mean(md):.3f} ± {_sd(md):.3f}** | {len(group)} |")
        lines += ["", "Paired differences in mean Dice (the same labelled volumes, seed and test volumes; mean ± sd over "
                  "rotations, and in how many rotations the first start is higher):", "",
                  "| N labelled | " + " | ".join(f"{LABELS[a]} − {LABELS[b]}" for a, b in PAIRS) + " |",
                  "|---|" + "---|" * len(PAIRS)]
        for n in sorted({r["n_labelled"] for r in doc["runs"]}):
            cells = []
            for a, b in PAIRS:
                d = paired(doc["runs"], n, a, b)
                cells.append(f"{np.mean(d):+.3f} ± {_sd(d):.3f} ({sum(x > 0 for x in d)}/{len(d)})" if d else "–")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "Every run:", ""]
    lines += ["| rotation | N labelled | start | " + " | ".join(organs) + " | mean Dice | DiceCE first → last epoch |",
              "|---|---|---|" + "---|" * (len(organs) + 2)]
    for r in sorted(doc["runs"], key=lambda r: (r.get("rotation", 0), r["n_labelled"], list(STARTS).index(r["start"]))):
        ep = r.get("finetune_epochs") or [{"loss": float("nan")}]
        lines.append(f"| {r.get('rotation', 0)} | {r['n_labelled']} | {LABELS[r['start']]} | "
                     + " | ".join(f"{r['dice'][o]:.3f}" for o in organs) + f" | {r['mean_dice']:.3f} | "
                     f"{ep[0]['loss']:.3f} → {ep[-1]['loss']:.3f} |")
    ckpt = doc["settings"].get("pretrained_checkpoint", "best.pt")
    lines += ["", f"Pretraining (the encoders start from `{ckpt}`"
              + ("; `best.pt` is the label-free selection on the validation loss" if ckpt == "best.pt" else
                 ", after every epoch; the test loss below is of `best.pt`, the validation-loss selection") + "):", ""]
    for name, p in doc["pretraining"].items():
        lines.append(f"- {LABELS[name]}: {len(p['epochs'])} epochs, {p['seconds_per_epoch']:.2f} s per epoch "
                     f"(median), {p['seconds']} s in all; val_loss per epoch "
                     f"{[r.get('val_loss') for r in p['epochs']]}; selected checkpoint's test loss "
                     f"{p['test_loss'].get('loss')}")
    ft = [r["finetune_seconds"] for r in doc["runs"]]
    if ft:
        lines.append(f"- fine-tuning: {np.median(ft):.0f} s per run (median), test inference "
                     f"{np.median([r['test_seconds'] for r in doc['runs']]):.0f} s per run over "
                     f"{len(doc['data']['test'])} volumes")
    lines += ["", "Settings: `" + json.dumps(doc["settings"]) + "`", ""]
    md = out.with_suffix(".md")
    reading = ""
    if md.is_file() and "\n## Reading" in md.read_text():
        reading = md.read_text()[md.read_text().index("\n## Reading"):]
    md.write_text("\n".join(lines) + reading)


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


PAIRS = (("pgl", "byol3d"), ("pgl", "random"), ("byol3d", "random"))


def paired(runs: Sequence[dict], n: int, a: str, b: str) -> list[float]:
    """Mean Dice of start ``a`` minus start ``b`` per rotation that has both, at ``n`` labelled volumes."""
    by = {(r["start"], r.get("rotation", 0)): r["mean_dice"] for r in runs if r["n_labelled"] == n}
    return [by[(a, rot)] - by[(b, rot)] for (s, rot) in sorted(by) if s == a and (b, rot) in by]


def summarize(runs: Sequence[dict]) -> list[tuple[int, str, list[dict]]]:
    """``(N, start, runs)`` groups over rotations, in table order."""
    keys = sorted({(r["n_labelled"], r["start"]) for r in runs}, key=lambda k: (k[0], list(STARTS).index(k[1])))
    return [(n, start, [r for r in runs if (r["n_labelled"], r["start"]) == (n, start)]) for n, start in keys]


def collect(parts: Sequence[str | os.PathLike], out: str | os.PathLike, command: str = "") -> dict[str, Any]:
    """Merge the JSON documents of runs made side by side (``--starts`` / ``--rotations`` subsets of one split and
    one setting) into ``<out>.json`` / ``<out>.md``; refuses documents of another split or other settings."""
    docs = [json.loads(Path(p).read_text()) for p in parts]
    first = docs[0]
    for p, d in zip(parts, docs):
        for key in ("test", "pretrain", "split_seed", "pixdim_mm"):
            if d["data"][key] != first["data"][key]:
                raise ValueError(f"{p}: data.{key} differs from {parts[0]}'s; cannot merge")
        if d["settings"] != first["settings"]:
            raise ValueError(f"{p}: settings differ from {parts[0]}'s; cannot merge")
    doc = dict(first, command="\n".join(d["command"] for d in docs) + ("\n" + command if command else ""),
               pretraining={k: v for d in docs for k, v in d["pretraining"].items()},
               runs=[r for d in docs for r in d["runs"]])
    doc["data"] = dict(first["data"], rotations={k: v for d in docs for k, v in d["data"].get("rotations", {}).items()})
    write(doc, Path(out))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-dir", default=str(ROOT.parent / "shared" / "data" / "mr_chaos"))
    ap.add_argument("--out", default="benchmarks/results/pgl_segmentation")
    ap.add_argument("--work", default="runs/bench_pgl")
    ap.add_argument("--n-test", type=int, default=5)
    ap.add_argument("--n-labelled", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pixdim", type=float, nargs=3, default=[3.0, 3.0, 6.0])
    ap.add_argument("--roi-size", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrain-items", type=int, default=16, help="crop pairs per pretraining epoch")
    ap.add_argument("--pretrain-lr", type=float, default=5e-4)
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--ft-lr", type=float, default=2e-3)
    ap.add_argument("--ft-steps", type=int, default=8, help="optimiser steps per fine-tuning epoch")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (pretraining and fine-tuning)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    ap.add_argument("--checkpoint", default="best.pt", choices=["best.pt", "last.pt"],
                    help="the pretraining checkpoint that starts the encoder")
    ap.add_argument("--rotations", type=int, nargs="+", default=[0],
                    help="labelled-set rotations (rotation r labels the pool's volumes from r * max(N) on; "
                         "fine-tuning seed + r)")
    ap.add_argument("--pool-size", type=int, default=4,
                    help="volumes per labelled-set rotation (at least max(--n-labelled))")
    ap.add_argument("--collect", nargs="+", metavar="JSON",
                    help="merge these result files of one setting into --out and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/pgl_segmentation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.collect:
        collect(args.collect, args.out, command)
        return 0
    run_benchmark(args.dataset_dir, args.out, args.work, n_test=args.n_test, n_labelled=args.n_labelled,
                  pixdim=args.pixdim, roi_size=args.roi_size, pretrain_epochs=args.pretrain_epochs,
                  pretrain_items=args.pretrain_items, pretrain_lr=args.pretrain_lr, ft_epochs=args.ft_epochs,
                  ft_steps=args.ft_steps, ft_lr=args.ft_lr, starts=args.starts, checkpoint=args.checkpoint,
                  amp=args.amp, rotations=args.rotations, pool_size=args.pool_size,
                  command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
