"""`medsim search --precision bf16` with and without the fp32 recheck, end to end (issue 16): image files, the
torch-free preprocessing, the export's engine, a faiss index built at fp32, leave-one-out queries of one split.

For each query: is its top-k *set* the one `--precision fp32` returns? Also the share the recheck re-embedded and
the wall time of each search (image decoding included, one run each: a whole-command figure, not a throughput
benchmark; `benchmarks/cpu_engines.py` times the engines).

    python benchmarks/search_recheck.py --model EXPORT --data RUN/split.json --split test \\
        --out benchmarks/results/search_recheck_r18_128

Writes ``<out>.json`` and ``<out>.md`` with the exact command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ham_recipe import command_line, write_results  # noqa: E402  benchmarks/ham_recipe.py


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an export folder (medsim export) with OpenVINO checks")
    ap.add_argument("--data", required=True,
                    help="a split JSON (or dataset) whose --split cases are indexed and queried")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "int8"))
    ap.add_argument("--index", default=None, help="index folder (default: built at fp32 in a temporary folder)")
    ap.add_argument("--out", default="benchmarks/results/search_recheck")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medsim.deploy.tasks import build_index, read_cases, search_images

    cases = read_cases(args.data, split=args.split)
    queries, ids = [c["uri"] for c in cases], [c["id"] for c in cases]
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(args.index) if args.index else Path(tmp) / "index"
        t0 = time.perf_counter()
        if not args.index:
            build_index(args.model, args.data, index, split=args.split, backend=args.backend, precision="fp32",
                        progress=False)
        t_index = time.perf_counter() - t0
        runs: dict[str, Any] = {}
        for name, precision, recheck in (("fp32", "fp32", False), (args.precision, args.precision, True),
                                         (f"{args.precision} --no-recheck", args.precision, False)):
            t0 = time.perf_counter()
            hits = search_images(index, queries, k=args.k, backend=args.backend, precision=precision,
                                 query_ids=ids, exclude_self=True, recheck=recheck)
            runs[name] = {"hits": hits, "wall_s": time.perf_counter() - t0}
    ref = [set(h.id for h in row) for row in runs["fp32"]["hits"]]
    ref_order = [[h.id for h in row] for row in runs["fp32"]["hits"]]
    rows = []
    for name, r in runs.items():
        hits = r["hits"]
        rows.append({"search": name, "queries": len(hits), "wall_s": round(r["wall_s"], 2),
                     "same_set": float(np.mean([set(h.id for h in row) == s for row, s in zip(hits, ref)])),
                     "same_order": float(np.mean([[h.id for h in row] == o for row, o in zip(hits, ref_order)])),
                     "rechecked": len(hits.rechecked), "margin": hits.margin, "note": hits.recheck_note})
    doc = {"command": command_line(argv), "config": vars(args), "cases": len(cases), "index_s": round(t_index, 1),
           "rows": rows}
    return write_results(args.out, doc, render_md)


def render_md(doc: dict[str, Any]) -> str:
    c = doc["config"]
    out = [f"# `medsim search` with the fp32 recheck: {c['model']}", "", f"Command: `{doc['command']}`", "",
           f"{doc['cases']} cases of the '{c['split']}' split: indexed at fp32, and each queried leave-one-out "
           f"(its own case excluded) for its top-{c['k']} on the {c['backend']} backend. Same set / order: the share "
           "of queries whose hits equal `--precision fp32`'s. Wall time: the whole search, image decoding "
           "included (one run).", "",
           "| search | same set | same order | rechecked in fp32 | wall s |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        out.append(f"| --precision {r['search']} | {r['same_set']:.2%} | {r['same_order']:.2%} | "
                   + (f"{r['rechecked']} ({r['rechecked'] / max(r['queries'], 1):.1%}; margin {r['margin']:.2g})"
                      if r["margin"] is not None else "–") + f" | {r['wall_s']:.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
