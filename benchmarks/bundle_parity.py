"""Behaviour check for refactors: train every bundle (and the DSL variants) on the embedded sample for 3 epochs with
one tree's code and write test metrics + per-epoch validation metrics; run it for the tree before and after a
change and compare the two res.json files.

    OMP_NUM_THREADS=1 PYTHONPATH=<tree> python benchmarks/bundle_parity.py <tree> <out>

Trees from before the plain-SupervisedTrainer change disable TensorBoard as ``train#handlers#4``; later ones as
``train#output_handlers#0``.
"""
import json, sys, pathlib, os
from medsim.engines.workflow import train_bundle
root = pathlib.Path(sys.argv[1]); out = pathlib.Path(sys.argv[2])
res = {}
for bundle, variant in [("isic_dsl", None), ("isic_dsl", "mml"), ("isic_dsl", "classifier"), ("isic_abe", None), ("derm_lossattn", None), ("derm_gated", None)]:
    name = bundle + ("_" + variant if variant else "")
    o = out / name
    ov = {"max_epochs": 3, "widen_factor": 0.25, "batch_size": 16, "eval_batch_size": 32, "min_neurons": 4}
    ov = {k: v for k, v in ov.items()}
    s = train_bundle(root / "bundles" / bundle, variant=variant, output_dir=str(o), overrides={**ov,
        "train#output_handlers#0#_disabled_" if "wt_table1" not in str(root) else "train#handlers#4#_disabled_": True})
    recs = [json.loads(l) for l in (o / "metrics.jsonl").read_text().splitlines()]
    res[name] = {"test": {k: s[k] for k in ("nmi", "R@1", "map_at_r") if k in s},
                 "val": [{k: r[k] for k in r if k.startswith("val_") or k == "loss"} for r in recs]}
json.dump(res, open(out / "res.json", "w"), indent=1)
print(json.dumps({k: v["test"] for k, v in res.items()}, indent=1))
