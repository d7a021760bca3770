"""MedAug vs MoCo v2 vs random init on NIH chest X-rays (issue 11): pretrain ``bundles/cxr_medaug`` with each
criterion (``moco`` = no metadata, two views of one image), then score the frozen encoders on the patient-grouped
test split: kNN and linear-probe accuracy / AUC of ``binary_label`` (``benchmarks/ssl_frozen.py``).

    python benchmarks/ssl_medaug.py --dataset-dir ../shared/data/cxr_nih1000 --epochs 30 \
        --out benchmarks/results/ssl_medaug_nih
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ssl_frozen import main as frozen_main  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cxr_medaug"
NAMES = {"moco": "moco_v2", "default": "medaug_same_patient", "same_view": "medaug_same_view",
         "diff_followup": "medaug_diff_followup"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-dir", required=True)
    ap.add_argument("--variants", nargs="+", default=["moco", "default", "same_view"], choices=list(NAMES))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--queue-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/ssl_medaug")
    ap.add_argument("--out", default="benchmarks/results/ssl_medaug_nih")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from medsim.engines.workflow import train_bundle

    work = Path(args.work)
    ov = {"max_epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size,
          "queue_size": args.queue_size, "seed": args.seed, "split_seed": 0,
          "train#output_handlers#0#_disabled_": True, "train#output_handlers#1#_disabled_": True}
    runs = []
    for variant in args.variants:
        out = work / NAMES[variant]
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        train_bundle(BUNDLE, variant=None if variant == "default" else variant, dataset_dir=args.dataset_dir,
                     output_dir=str(out), overrides=dict(ov))
        criterion = json.loads((out / "config.json").read_text())["criterion"]
        runs.append(str(out))
        print(f"{variant} ({criterion}): {time.time() - t0:.0f} s", flush=True)
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    return frozen_main(["--runs", *runs, "--out", args.out, "--title",
                        f"NIH1000: MedAug vs MoCo v2 vs random init (frozen encoders; {args.epochs} epochs, "
                        f"{args.image_size} px, batch {args.batch_size}, queue {args.queue_size}); pretraining: "
                        f"`{cmd}`"])


if __name__ == "__main__":
    raise SystemExit(main())
