"""Self-supervised pretraining on HAM10000 without labels (issue 11), then the frozen-embedding evaluation.

Each method of ``bundles/derm_ssl`` trains on the training split of the shared HAM10000 recipe
(``benchmarks/ham_recipe.py``: the same class-stratified, lesion-grouped 3000-image subset and ``split_seed`` 0 as
every HAM benchmark, so the test lesions of ``dsl_table1`` & co. are never seen in pretraining), with bf16 autocast
+ channels_last. Then ``benchmarks/ssl_frozen.py`` scores each encoder (kNN, linear probe, NMI/R@1/MAP@R on the
test split) against a random-init encoder of the same architecture.

    python benchmarks/ssl_pretrain.py --dataset-dir ../shared/data/ham10000 --methods simclr byol vicreg moco \
        --epochs 20 --work runs/ssl --out benchmarks/results/ssl_frozen_ham
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ham_recipe import common_overrides, recipe_parser  # noqa: E402
from ssl_frozen import main as frozen_main  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "derm_ssl"


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__, name="ssl_frozen_ham", work="runs/ssl", epochs=20)
    ap.add_argument("--methods", nargs="+", default=["simclr", "byol", "vicreg", "moco"],
                    choices=["simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "wmse"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep finished runs in --work (resume instead of delete)")
    args = ap.parse_args(argv)
    from medsim.engines.workflow import train_bundle

    work = Path(args.work)
    common = common_overrides(args, batch_size=args.batch_size, seed=args.seed,
                              **{"train#output_handlers#0#_disabled_": True})
    log = {}
    for method in args.methods:
        out = work / method
        if out.exists() and not args.keep:
            shutil.rmtree(out)
        t0 = time.time()
        res = train_bundle(BUNDLE, variant=method, dataset_dir=args.dataset_dir, output_dir=str(out),
                           overrides=dict(common))
        log[method] = {"seconds": round(time.time() - t0, 1), "test_nmi": res.get("nmi"), "test_R@1": res.get("R@1")}
        print(f"[{time.time() - t0:7.0f}s] {method}: {log[method]}", flush=True)
    (work / "pretrain_log.json").write_text(json.dumps({"overrides": common, "runs": log}, indent=1))
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    return frozen_main(["--runs", *[str(work / m) for m in args.methods], "--out", args.out,
                        "--title", f"Frozen HAM10000 encoders after SSL pretraining ({args.epochs} epochs, "
                                   f"{args.image_size} px, batch {args.batch_size}); pretraining: `{cmd}`"])


if __name__ == "__main__":
    raise SystemExit(main())
