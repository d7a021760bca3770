"""Case-index scale benchmark: ``CaseIndex.build`` of the ``ondisk`` (or ``sharded``) kind from a disk memmap of
1M-10M clustered 128-d vectors, and what it costs — build time (train + add + save), peak memory, size on disk,
query latency and recall@10 against exact search — with a cost curve fitted over N and extrapolated to 100M.

For each size N, in a fresh process (so peak memory is that size's):

1. the vectors (``clustered`` of ``faiss_indexes.py``: ``--clusters`` low-rank gaussian clusters, L2-normalised,
   seeded) are written block by block to ``<work>/x_<N>.f32`` with plain file writes, then opened as a read-only
   ``np.memmap``: RAM never holds them all;
2. ``CaseIndex.build`` trains the coarse quantizer on ``64 · nlist`` sampled rows (``nlist`` = ``default_nlist(N)``
   = 4·sqrt(N)), adds ``--chunk`` rows at a time into in-memory IVF shards of ``--shard-size`` vectors that spill to
   temporary files, and merges them into one ``.ivfdata`` file (faiss ``OnDiskInvertedLists``);
3. the saved index is loaded back (``CaseIndex.load``: checksums, on-disk lists memory-mapped read-only) and
   searched: recall@10 of ``--queries`` queries against exact top-10 computed over the memmap in blocks with
   ``faiss.IndexFlatIP`` and ``faiss.ResultHeap``; batch-1 latency (median, p95) over ``--latency-queries``
   queries and batch-64 throughput, for each ``--nprobe``; the smallest nprobe with recall@10 ≥ ``--target-recall``
   is reported as the operating point;
4. the memmap and the index are deleted (``--keep`` keeps them).

Memory: ``ru_maxrss`` counts the file pages a process has mapped (memmap blocks read, the ``.ivfdata`` mapping),
which the kernel can drop at any time; ``peak_anon`` (the largest ``RssAnon`` of ``/proc/self/status``, sampled
every 20 ms) is the memory the process itself needs. Both are reported; the fit uses ``peak_anon``.

Cost curve: least squares over the measured sizes of ``y = a + b·N`` (memory, disk) and of ``log y = log c + p·log N``
(time, as IVF training and assignment grow faster than N since nlist grows with sqrt(N)), both extrapolated to
``--extrapolate`` (100M).

    python benchmarks/faiss_scale.py --sizes 1e6,2e6,5e6,1e7 --work /tmp/medsim_faiss_scale

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/faiss_scale``) with the exact command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faiss_indexes import clustered, machine, recall_per_query  # noqa: E402
from ham_recipe import command_line, write_results  # noqa: E402

log = logging.getLogger("faiss_scale")


# --------------------------------------------------------------------------- data, ground truth, memory

def write_memmap(path: Path, n: int, args: argparse.Namespace) -> np.memmap:
    """``n`` clustered vectors written to ``path`` ``--chunk`` rows at a time (each block seeded by its position,
    cluster centres shared), opened read-only as an ``(n, dim)`` float32 memmap."""
    with open(path, "wb") as f:
        for b, s in enumerate(range(0, n, args.chunk)):
            m = min(args.chunk, n - s)
            f.write(clustered(m, args.dim, n_clusters=args.clusters, intrinsic=args.intrinsic,
                              seed=args.seed * 1_000_003 + b, chunk=4096).tobytes())  # small temporaries
    return np.memmap(path, np.float32, "r", shape=(n, args.dim))


def queries(n: int, args: argparse.Namespace) -> np.ndarray:
    """Fresh draws from the database's distribution (not rows of it)."""
    return clustered(n, args.dim, n_clusters=args.clusters, intrinsic=args.intrinsic, seed=args.seed + 999_983)


def exact_top_k(x: np.memmap, q: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Exact top-``k`` row indices by inner product, ``(Q, k)``: ``faiss.IndexFlatIP`` over ``chunk``-row blocks of
    the memmap, merged by ``faiss.ResultHeap``."""
    import faiss

    heap = faiss.ResultHeap(q.shape[0], k, keep_max=True)
    for s in range(0, x.shape[0], chunk):
        block = faiss.IndexFlatIP(x.shape[1])
        block.add(np.ascontiguousarray(x[s:s + chunk]))
        scores, ids = block.search(q, k)
        heap.add_result(scores, np.where(ids >= 0, ids + s, -1))
    heap.finalize()
    return heap.I


class PeakAnon:
    """Largest ``RssAnon`` (bytes) of this process while the ``with`` block runs, sampled every ``every`` s."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def now() -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakAnon":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- one size (in a fresh process)

def bench_size(n: int, a: dict[str, Any]) -> dict[str, Any]:
    import faiss

    from medsim.deploy.index import CaseIndex

    args = argparse.Namespace(**a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, folder = work / f"x_{n}.f32", work / f"index_{n}"
    row: dict[str, Any] = {"N": n}
    try:
        t0 = time.perf_counter()
        x = write_memmap(data, n, args)
        row["generate_s"] = time.perf_counter() - t0
        log.info("N=%d: wrote %s (%.1f GB) in %.0f s", n, data, data.stat().st_size / 1e9, row["generate_s"])
        with PeakAnon() as peak:
            t0 = time.perf_counter()
            index = CaseIndex.build(folder, x, kind=args.kind, codes=args.codes, shards=args.shards,
                                    shard_size=args.shard_size, chunk_size=args.chunk, model_id="bench",
                                    use_gpu=False, progress=sys.stderr.isatty())
            row["build_s"] = time.perf_counter() - t0
        row.update(index.build_timings, nlist=index.nlist, factory=index.factory_string,
                   peak_anon_build_bytes=peak.peak, peak_rss_build_bytes=max_rss_bytes(),
                   index_bytes=folder_bytes(folder))
        del index
        log.info("N=%d: built %s in %.0f s (train %.0f, add %.0f, save %.0f), %.2f GB on disk, peak anon %.2f GB",
                 n, row["factory"], row["build_s"], row["train_s"], row["add_s"], row["save_s"],
                 row["index_bytes"] / 1e9, peak.peak / 1e9)
        q = queries(max(args.queries, args.latency_queries), args)
        t0 = time.perf_counter()
        truth = exact_top_k(x, q[:args.queries], args.k, args.chunk)
        row["exact_s"] = time.perf_counter() - t0
        with PeakAnon() as peak:
            t0 = time.perf_counter()
            index = CaseIndex.load(folder, use_gpu=False)
            row["load_s"] = time.perf_counter() - t0
            # nprobe values above nlist are clipped to it (every list visited: exact with flat codes)
            row["search"] = [search_row(index, q, truth, nprobe, args)
                             for nprobe in sorted({min(p, index.nlist) for p in args.nprobe})]
        row["peak_anon_search_bytes"] = peak.peak
        row["peak_anon_bytes"] = max(row["peak_anon_build_bytes"], peak.peak)
        row["peak_rss_bytes"] = max_rss_bytes()
        ok = [r for r in row["search"] if r["recall@10"] >= args.target_recall]
        row["chosen"] = min(ok, key=lambda r: r["nprobe"]) if ok else max(row["search"], key=lambda r: r["recall@10"])
        row["threads"] = faiss.omp_get_max_threads()
    finally:
        if not args.keep:
            data.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
    return row


def search_row(index: Any, q: np.ndarray, truth: np.ndarray, nprobe: int, args: argparse.Namespace) -> dict:
    found = index.search_arrays(q[:args.queries], args.k, nprobe=nprobe)[1]
    recall = float(recall_per_query(found, truth).mean())
    lat = []
    for i in range(args.latency_queries):
        t0 = time.perf_counter()
        index.search_arrays(q[i:i + 1], args.k, nprobe=nprobe)
        lat.append(time.perf_counter() - t0)
    nb = max(1, args.latency_queries // 64) * 64
    qb = np.resize(q, (nb, q.shape[1]))
    t0 = time.perf_counter()
    for s in range(0, nb, 64):
        index.search_arrays(qb[s:s + 64], args.k, nprobe=nprobe)
    qps = nb / (time.perf_counter() - t0)
    r = {"nprobe": nprobe, "recall@10": recall, "latency_ms_p50": float(np.median(lat) * 1e3),
         "latency_ms_p95": float(np.percentile(lat, 95) * 1e3), "qps_batch64": qps}
    log.info("N=%d nprobe=%4d  recall@10 %.4f  batch-1 p50 %.2f ms p95 %.2f ms  batch-64 %.0f q/s", len(index),
             nprobe, recall, r["latency_ms_p50"], r["latency_ms_p95"], qps)
    return r


# --------------------------------------------------------------------------- cost curve and report

def fit(sizes: list[int], values: list[float], law: str, at: int) -> dict[str, Any] | None:
    """Least squares of ``values`` over ``sizes``: ``law="linear"``: ``y = a + b·N``; ``"power"``: ``y = c·N^p``
    (linear in log-log). Returns the coefficients, the formula, R² (of y) and the prediction at ``at``."""
    n, y = np.asarray(sizes, float), np.asarray(values, float)
    if len(n) < 2 or (y <= 0).any() and law == "power":
        return None
    if law == "linear":
        b, a = np.polyfit(n, y, 1)
        pred, formula, coef = a + b * n, f"{a:.4g} + {b:.4g}·N", {"a": a, "b": b}
        at_value = a + b * at
    else:
        p, logc = np.polyfit(np.log(n), np.log(y), 1)
        c = float(np.exp(logc))
        pred, formula, coef = c * n ** p, f"{c:.4g}·N^{p:.3f}", {"c": c, "p": p}
        at_value = c * at ** p
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return {"law": law, "formula": formula, **{k: float(v) for k, v in coef.items()}, "r2": r2,
            "at_N": at, "predicted": float(at_value)}


def fits(rows: list[dict], at: int) -> dict[str, Any]:
    sizes = [r["N"] for r in rows]
    out: dict[str, Any] = {}
    for key, law in (("build_s", "power"), ("train_s", "power"), ("add_s", "power"), ("peak_anon_bytes", "linear"),
                     ("peak_rss_bytes", "linear"), ("index_bytes", "linear")):
        f = fit(sizes, [r[key] for r in rows], law, at)
        if f is not None:
            out[key] = f
    lat = fit(sizes, [r["chosen"]["latency_ms_p50"] for r in rows], "power", at)
    if lat is not None:
        out["latency_ms_p50_at_target"] = lat
    return out


def report(doc: dict) -> str:
    a, m = doc["args"], doc["machine"]
    gb = 1e9
    lines = [
        f"# Case-index scale benchmark: CaseIndex kind={a['kind']!r} ({a['codes']} codes) from a disk memmap",
        "", f"Command: `{doc['command']}`", "",
        f"Machine: {m['cores']} cores ({m['cpu']}), faiss {m['faiss']} with {m['faiss_threads']} threads, numpy "
        f"{m['numpy']}, Python {m['python']}; load average at start {m['loadavg_start'][0]:.2f}, at end "
        f"{doc['loadavg_end'][0]:.2f}. Total {doc['total_s'] / 60:.1f} min"
        f"{'' if doc.get('complete', True) else ' (incomplete: the run stopped before the last size)'}"
        + (f"; sizes {', '.join(f'{n:,}' for n in doc['merged']['sizes'])} are merged from the earlier run "
           f"({', '.join(doc['merged']['files'])}), on the same machine and settings, and the total is this run's"
           if doc.get("merged", {}).get("sizes") else "") + ".", "",
        f"Data: {a['dim']}-d L2-normalised float32 from {a['clusters']} clusters of intrinsic dimension "
        f"{a['intrinsic']} (seed {a['seed']}), written to a memmap in blocks of {a['chunk']:,}; {a['queries']} "
        f"queries (recall@10 against exact search over the memmap), {a['latency_queries']} for batch-1 latency; "
        f"k={a['k']}, cosine. Build = train + add + save (`CaseIndex.build`); the search runs on the index loaded "
        f"back from disk. Peak anon = largest RssAnon (what the process needs); max RSS also counts mapped file "
        f"pages (memmap, .ivfdata) the kernel can drop.", "",
        f"## Build and operating point (smallest nprobe with recall@10 ≥ {a['target_recall']})", "",
        "| N | factory | train s | add s | save s | build s | load s | peak anon GB | max RSS GB | disk GB | "
        "nprobe | recall@10 | p50 ms | p95 ms | batch-64 q/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["sizes"]:
        c = r["chosen"]
        lines.append(f"| {r['N']:,} | {r['factory']} | {r['train_s']:.1f} | {r['add_s']:.1f} | {r['save_s']:.1f} | "
                     f"{r['build_s']:.1f} | {r['load_s']:.1f} | {r['peak_anon_bytes'] / gb:.2f} | "
                     f"{r['peak_rss_bytes'] / gb:.2f} | {r['index_bytes'] / gb:.2f} | {c['nprobe']} | "
                     f"{c['recall@10']:.4f} | {c['latency_ms_p50']:.2f} | {c['latency_ms_p95']:.2f} | "
                     f"{c['qps_batch64']:,.0f} |")
    for r in doc["sizes"]:
        lines += ["", f"## N = {r['N']:,}: nprobe sweep (nlist {r['nlist']})", "",
                  "| nprobe | recall@10 | p50 ms | p95 ms | batch-64 q/s |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['nprobe']} | {s['recall@10']:.4f} | {s['latency_ms_p50']:.2f} | {s['latency_ms_p95']:.2f} | "
                  f"{s['qps_batch64']:,.0f} |" for s in r["search"]]
    if doc["fit"]:
        measured = ", ".join(f"{r['N']:,}" for r in doc["sizes"])
        lines += ["", f"## Cost curve (least squares over N = {measured}), "
                  f"extrapolated to N = {a['extrapolate']:,}", "",
                  "| quantity | fit | R² | at extrapolated N |", "|---|---|---:|---:|"]
        units = {"bytes": (gb, "GB"), "_s": (1, "s"), "ms_p50_at_target": (1, "ms")}
        for key, f in doc["fit"].items():
            scale, unit = next(v for k, v in units.items() if key.endswith(k))
            lines.append(f"| {key} | {f['formula']} | {f['r2']:.3f} | {f['predicted'] / scale:,.1f} {unit} |")
        lines += ["", "Power laws for times (IVF training and assignment cost grow like N·nlist ∝ N^1.5 while nlist "
                  "= 4·sqrt(N)); linear laws for memory and disk. Extrapolating far beyond the measured sizes is "
                  "an estimate, not a measurement."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

SAME = ("dim", "clusters", "intrinsic", "seed", "kind", "codes", "shards", "k", "queries", "latency_queries",
        "nprobe", "target_recall")


def merged_rows(paths: list[str], args: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """The size rows and commands of earlier result files; refuses one whose data or index settings differ."""
    rows: list[dict] = []
    commands: list[str] = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        diff = [k for k in SAME if doc["args"].get(k) != args.get(k)]
        if diff:
            raise SystemExit(f"--merge {path}: settings differ from this run's ({', '.join(diff)}); not merged")
        rows += [r for r in doc["sizes"] if r["N"] not in {x["N"] for x in rows}]
        commands.append(doc["command"])
    return rows, commands


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(float(v)) for v in s.replace(",", " ").split()]  # noqa: E731 - "1e6" works too
    ap.add_argument("--sizes", type=ints, nargs="+", default=[[1_000_000, 2_000_000, 5_000_000, 10_000_000]],
                    help="database sizes, e.g. --sizes 1e6 2e6 5e6 1e7 (or comma-separated)")
    ap.add_argument("--work", default="/tmp/medsim_faiss_scale",
                    help="scratch folder for the memmaps and indexes (needs ~3 × 512 bytes × N free at the "
                         "largest N with flat codes: memmap + temporary shards + merged lists)")
    ap.add_argument("--out", default="benchmarks/results/faiss_scale")
    ap.add_argument("--kind", choices=["ondisk", "sharded"], default="ondisk")
    ap.add_argument("--codes", choices=["flat", "pq"], default="flat")
    ap.add_argument("--shards", type=int, default=4, help="sharded: shard count")
    ap.add_argument("--shard-size", type=int, default=1_000_000, help="ondisk: vectors per temporary shard")
    ap.add_argument("--chunk", type=int, default=100_000, help="rows per block (generation, add, exact search)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--intrinsic", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200, help="queries for recall@10 (exact top-10 per size)")
    ap.add_argument("--latency-queries", type=int, default=300, help="batch-1 queries timed per nprobe")
    ap.add_argument("--nprobe", type=lambda s: ints(s), default=[4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--extrapolate", type=lambda s: int(float(s)), default=100_000_000)
    ap.add_argument("--keep", action="store_true", help="keep each size's memmap and index in --work")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="earlier results of the same settings: their sizes join this run's table and fit "
                         "(sizes measured here replace theirs)")
    args = ap.parse_args(argv)
    args.sizes = sorted({n for group in args.sizes for n in group})
    earlier, commands = merged_rows(args.merge, vars(args))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    info = machine()
    t_start = time.perf_counter()
    rows: list[dict] = []
    for n in args.sizes:
        # a fresh process per size: its own peak memory; a worker killed (e.g. out of memory) raises
        # BrokenProcessPool here instead of waiting forever
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(bench_size, n, vars(args)).result())
        all_rows = sorted([r for r in earlier if r["N"] not in args.sizes] + rows, key=lambda r: r["N"])
        doc = {"command": " ; then ".join(commands + [command_line(argv)]), "args": vars(args), "machine": info,
               "sizes": all_rows, "complete": len(rows) == len(args.sizes), "fit": fits(all_rows, args.extrapolate),
               "merged": {"files": args.merge, "sizes": [r["N"] for r in earlier if r["N"] not in args.sizes]},
               "loadavg_end": list(os.getloadavg()), "total_s": time.perf_counter() - t_start}
        write_results(args.out, doc, report)  # after every size: a later failure keeps what was measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
