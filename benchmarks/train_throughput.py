"""Training throughput on this CPU: fp32 vs bf16 autocast vs bf16 + channels_last (issue 10, "Done when").

Part 1, throughput: the isic_dsl bundle's own network and loss (``network_def`` and ``metric_loss`` of
``bundles/isic_dsl/configs/train.json``: Embedder resnet18 width ×0.5 cut after layer3 + DSL attention, 128-d,
MarginLoss + DistanceWeightedMiner), Adam, batch 32 (8 classes × 4) at 64 px. One training step = forward through
``medsim.engines.PrecisionInferer`` (what the trainer and the validation evaluator use), the loss in fp32, backward,
``Adam.step``; data loading is not part of it. The three modes are timed in interleaved rounds (every mode once
per round, in a rotating order), each on its own copy of the same initial weights; the table gives the median over
rounds and the median of the per-round ratio to fp32 ("paired"), which cancels slow drifts of a shared machine.

Part 2, accuracy: a short run of the bundle per mode and seed on the shared HAM10000 recipe (``ham_recipe``:
class-stratified, lesion-grouped subset, split seed 0, the same split for every run) through ``medsim train``'s
``train_bundle`` with ``-o amp=… channels_last=…``; the final epoch's validation NMI and the run's wall time.

    nice python benchmarks/train_throughput.py --dataset-dir ../shared/data/ham10000 --threads 2

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/train_throughput``).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ham_recipe import common_overrides, recipe_parser, rerender  # benchmarks/ham_recipe.py: the shared HAM10000 recipe
from ort_throughput import cpu_info, other_cpu_now, timed, wait_quiet  # same timing and interference measure

SPEEDUP_GOAL = 2.0
MODES = {"fp32": {"amp": False, "channels_last": False},
         "bf16": {"amp": True, "channels_last": False},
         "bf16+channels_last": {"amp": True, "channels_last": True}}


def bf16_isa() -> list[str]:
    """The CPU's bf16 instructions (AMX on recent Xeons, AVX512-BF16 on Zen 4 / Cooper Lake), from /proc/cpuinfo."""
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    return [f for f in ("amx_bf16", "amx_tile", "avx512_bf16") if f in flags]


def bundle_parts(image_size: int, backbone: str, widen_factor: float, n_classes: int = 7):
    """The isic_dsl bundle's ``network_def`` and ``metric_loss``, parsed from its train.json (same model)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("bundles/isic_dsl/configs/train.json")
    parser.update({"classes": list(range(n_classes)), "image_size": image_size, "backbone": backbone,
                   "widen_factor": widen_factor})
    return parser.get_parsed_content("network_def", instantiate=True), \
        parser.get_parsed_content("metric_loss", instantiate=True)


def throughput(args) -> dict[str, Any]:
    import torch

    from medsim.engines import PrecisionInferer

    torch.manual_seed(0)
    net0, loss0 = bundle_parts(args.image_size, args.backbone, args.widen_factor)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.arange(args.batch_size) // 4 % 7  # m_per_class 4, as the bundle's sampler draws batches
    steps = {}
    for name, mode in MODES.items():
        net, loss_fn = copy.deepcopy(net0), copy.deepcopy(loss0)
        opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=5e-4)
        inferer = PrecisionInferer(amp=mode["amp"], dtype="bfloat16", channels_last=mode["channels_last"])

        def step(net=net, loss_fn=loss_fn, opt=opt, inferer=inferer):
            net.train()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(inferer(x, net)["embedding"], y)
            loss.backward()
            opt.step()
            return loss

        steps[name] = step
        for _ in range(args.warmup):
            step()
    rounds = []
    names = list(MODES)
    for r in range(args.rounds):
        waited, _ = wait_quiet(args.quiet_cpu, args.max_wait)
        order = names[r % len(names):] + names[:r % len(names)]
        row: dict[str, Any] = {"round": r, "order": order, "waited_s": round(waited, 1)}
        for name in order:
            ips, other, own = timed(steps[name], args.batch_size, args.seconds)
            row[name] = {"img_s": round(ips, 2), "img_per_cpu_s": round(ips / max(own, 1e-9), 2),
                         "other_cpus": round(other, 2), "own_cpus": round(own, 2)}
        row["quiet"] = max(row[n]["other_cpus"] for n in names) < args.quiet_cpu
        rounds.append(row)
        print(f"round {r} ({'quiet' if row['quiet'] else 'loaded'}): "
              + "  ".join(f"{n} {row[n]['img_s']:.1f} img/s" for n in names), flush=True)
    summary = {"all": _summarise(rounds, names)}
    quiet = [row for row in rounds if row["quiet"]]
    summary["quiet"] = _summarise(quiet, names) if len(quiet) >= 3 else None
    return {"rounds": rounds, "summary": summary}


def _summarise(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_rounds": len(rounds)}
    for name in names:
        ips = [row[name]["img_s"] for row in rounds]
        out[name] = {"img_s_median": round(statistics.median(ips), 2), "img_s_min": min(ips), "img_s_max": max(ips),
                     "x_fp32_paired": round(statistics.median(row[name]["img_s"] / row["fp32"]["img_s"]
                                                              for row in rounds), 3),
                     "img_per_cpu_s_median": round(statistics.median(row[name]["img_per_cpu_s"] for row in rounds), 2),
                     "x_fp32_per_cpu_s_paired": round(statistics.median(
                         row[name]["img_per_cpu_s"] / row["fp32"]["img_per_cpu_s"] for row in rounds), 3),
                     "other_cpus_median": round(statistics.median(row[name]["other_cpus"] for row in rounds), 2)}
    return out


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def short_runs(args) -> list[dict[str, Any]]:
    from medsim.data.splits import copy_split
    from medsim.engines.workflow import train_bundle

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    shared_split, runs = None, []
    for seed in args.seeds:
        for name, mode in MODES.items():
            out = work / f"{name.replace('+', '_')}_s{seed}"
            out.mkdir(parents=True, exist_ok=True)
            if shared_split is not None:
                copy_split(shared_split, out / "split.json")
            t0 = time.perf_counter()
            res = train_bundle("bundles/isic_dsl", dataset_dir=args.dataset_dir, output_dir=str(out),
                               overrides=common_overrides(args, seed=seed, **mode))
            wall = time.perf_counter() - t0
            shared_split = shared_split or out / "split.json"
            hist = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
            runs.append({"mode": name, "seed": seed, "wall_s": round(wall, 1),
                         "epoch_s": [e.get("seconds") for e in hist],
                         "val_nmi": [e.get("val_nmi") for e in hist], "final_val_nmi": hist[-1].get("val_nmi"),
                         "test_nmi": res["nmi"], "test_R@1": res["R@1"]})
            print(f"{name:<20} seed {seed}: final val NMI {hist[-1].get('val_nmi'):.4f}  test NMI {res['nmi']:.4f} "
                  f"({wall:.0f} s)", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__, name="train_throughput", work="runs/bench_train_throughput", epochs=3, threads=2,
                       report_from=True)
    ap.set_defaults(max_items=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per mode and round")
    ap.add_argument("--quiet-cpu", type=float, default=0.25,
                    help="before each round wait until other processes use fewer CPUs than this; a round is quiet "
                         "when they stayed below it in all its timed blocks")
    ap.add_argument("--max-wait", type=float, default=20.0, help="longest wait for quiet before a round (s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before the rounds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--skip-runs", action="store_true", help="throughput only")
    args = ap.parse_args(argv)
    if rerender(args, report):
        return 0
    import torch

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    doc: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "config": vars(args), "goal": f">= {SPEEDUP_GOAL}x fp32 training images/s at equal validation NMI",
        "machine": {**cpu_info(), "bf16_isa": bf16_isa(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(), "other_cpus_at_start": round(other_cpu_now(), 2),
                    "loadavg_start": load_start},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    doc["throughput"] = throughput(args)
    doc["machine"]["loadavg_after_throughput"] = os.getloadavg()
    doc["runs"] = [] if args.skip_runs else short_runs(args)
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["total_s"] = round(time.perf_counter() - t_all, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(report(doc))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def report(doc: dict) -> str:
    c, m = doc["config"], doc["machine"]
    lines = ["# Training throughput: fp32 vs bf16 autocast vs bf16 + channels_last (CPU)", "",
             f"Command: `{doc['command']}` (started {doc['started']}, {doc['total_s'] / 60:.1f} min)"
             + (f"; {doc['rendered']}" if doc.get("rendered") else ""), "",
             f"Machine: {m.get('Model name', '?')}, {m.get('logical_cpus')} logical CPUs, ISA "
             f"{', '.join(m.get('isa_flags', []))}, bf16 instructions: {', '.join(m.get('bf16_isa', [])) or 'none'}; "
             f"torch {m['torch']} with {m['torch_threads']} threads, run under `nice`. "
             "**Shared machine: other engineers run their tests on it** (load average "
             f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_after_throughput'][0]:.2f} after the throughput part, "
             f"{m['loadavg_end'][0]:.2f} at the end, on {m.get('logical_cpus')} CPUs; the CPUs other processes used "
             "during each timed block, from `/proc/stat`, are in the last column).", "",
             f"Goal: {doc['goal']}.", "",
             "## Throughput (training step: forward through PrecisionInferer, fp32 loss, backward, Adam step)", "",
             f"isic_dsl's `network_def` + `metric_loss` (resnet18 width ×{c['widen_factor']} cut after layer3, DSL "
             f"attention, 128-d; MarginLoss + DistanceWeightedMiner), batch {c['batch_size']}, {c['image_size']} px, "
             f"{c['rounds']} interleaved rounds of {c['seconds']} s per mode after {c['warmup']} warm-up steps; "
             "fixed random input (no data loading).", "",
             "Tables: median over rounds; \"paired\" = median over rounds of the ratio to fp32 in the same round; "
             "img per CPU-s = images per CPU-second this process used (less sensitive to other jobs taking the "
             f"cores). Before each round the script waited up to {c['max_wait']:.0f} s for other processes to drop "
             f"below {c['quiet_cpu']} CPUs; quiet rounds are those where they stayed below it throughout."]
    for which, title in (("all", "All rounds"), ("quiet", "Quiet rounds only")):
        tp = doc["throughput"]["summary"].get(which)
        if not tp:
            lines += ["", f"### {title}: fewer than 3 quiet rounds, no table"]
            continue
        lines += ["", f"### {title} ({tp['n_rounds']})", "",
                  "| mode | img/s (median) | min–max | × fp32 | × fp32 (paired) | img per CPU-s "
                  "| × fp32 per CPU-s (paired) | other jobs (CPUs, median) |", "|---|---|---|---|---|---|---|---|"]
        base = tp["fp32"]["img_s_median"]
        for name in MODES:
            t = tp[name]
            lines.append(f"| {name} | {t['img_s_median']:.1f} | {t['img_s_min']:.0f}–{t['img_s_max']:.0f} | "
                         f"{t['img_s_median'] / base:.2f}× | {t['x_fp32_paired']:.2f}× | "
                         f"{t['img_per_cpu_s_median']:.1f} | {t['x_fp32_per_cpu_s_paired']:.2f}× | "
                         f"{t['other_cpus_median']:.2f} |")
    runs = doc["runs"]
    if runs:
        lines += ["", f"## Short runs ({c['epochs']} epochs, {c['max_items']} HAM10000 images, split seed 0, "
                      f"seeds {c['seeds']})", "",
                  "Whole `medsim train` runs of the isic_dsl bundle (DSL; training + validation + re-clustering; "
                  "data loading and caching included), same split for every run.", "",
                  "| mode | seed | final val NMI | val NMI per epoch | test NMI | test R@1 | wall (s) | epoch s |",
                  "|---|---|---|---|---|---|---|---|"]
        per_mode = {name: [r for r in runs if r["mode"] == name] for name in MODES}
        summary = ["", "Mean ± std over seeds (epoch s: epochs 2 onward, after the first epoch filled the cache):", "",
                   "| mode | final val NMI | test NMI | test R@1 | epoch s | epoch × fp32 |", "|---|---|---|---|---|---|"]
        base_epoch = statistics.mean(s for r in per_mode["fp32"] for s in r["epoch_s"][1:])
        for name, rs in per_mode.items():
            epoch = statistics.mean(s for r in rs for s in r["epoch_s"][1:])
            summary.append(f"| {name} | {_mean_std([r['final_val_nmi'] for r in rs])} | "
                           f"{_mean_std([r['test_nmi'] for r in rs])} | {_mean_std([r['test_R@1'] for r in rs])} | "
                           f"{epoch:.2f} | {base_epoch / epoch:.2f}× |")
        lines += summary + ["", "Every run:", "", lines.pop(-2), lines.pop(-1)]
        for r in runs:
            lines.append(f"| {r['mode']} | {r['seed']} | {r['final_val_nmi']:.4f} | "
                         f"{', '.join(f'{v:.4f}' for v in r['val_nmi'])} | {r['test_nmi']:.4f} | "
                         f"{r['test_R@1']:.4f} | {r['wall_s']:.0f} | {', '.join(str(s) for s in r['epoch_s'])} |")
    if doc.get("reading"):  # written by hand after a run, kept in the JSON
        lines += ["", doc["reading"].rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
