"""The 3-D bundles on the real CT of ``../shared/data/ct`` (issue 14: "both bundles train ... on the real CT"), and
the SAM run's export searching organ landmarks across those scans, torch-free.

The folder holds few volumes (``abdomen_3mm``, ``abdomen_small_3mm``, ``aorta_1p5mm``, ``thorax_1p5mm``, the
20-slice ``dicom_series`` and one MR, ``mr_small_3mm``); ``medsim.data.volumes`` finds them all, NIfTI files and the
DICOM series alike. The runs are trained first with the plain CLI (their commands are recorded with ``--commands``)::

    medsim train bundles/ct_sam --dataset-dir ../shared/data/ct --output runs/ct_sam_real --threads 1 -o amp=true
    medsim train bundles/ct_pgl --dataset-dir ../shared/data/ct --output runs/ct_pgl_real --threads 1 -o amp=true
    python benchmarks/ct_real.py --runs runs/ct_sam_real runs/ct_pgl_real --out benchmarks/results/ct_real

This script reads each run's ``metrics.jsonl`` / ``split.local.json`` (cost per epoch, loss and validation metric
first → last), exports the SAM run (``medsim.export.pipeline.export_run``, its last checkpoint) and, for every ordered
pair of the CT volumes that have a TotalSegmentator label map, finds each organ centroid of the template (spleen,
kidneys, liver) in the target with ``medsim.deploy.landmark.find_landmarks`` (whole volumes, onnxruntime), against
the target's own centroid; "no search" (the template's world point itself) is the baseline. The label maps are
TotalSegmentator predictions, not manual labels; volumes of the run's own training split are marked, since SAM
is label-free but has seen their images.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}  # label_names_total_v2.json


def run_summary(run: Path) -> dict[str, Any]:
    """Epochs, median seconds per epoch, first/last training loss and validation metric, the split by volume."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in recs if "loss" in r]
    record = json.loads((run / "run.json").read_text())
    metric = next((k for k in ("val_match", "val_loss") if epochs and k in epochs[0]), None)
    split = json.loads((run / "split.local.json").read_text())
    return {"run": str(run), "bundle": record.get("bundle"), "epochs": len(epochs),
            "seconds_per_epoch": float(np.median([r["seconds"] for r in epochs])) if epochs else None,
            "loss": [epochs[0]["loss"], epochs[-1]["loss"]] if epochs else None, "metric": metric,
            "metric_first_last_best": [epochs[0][metric], epochs[-1][metric],
                                       (max if metric == "val_match" else min)(r[metric] for r in epochs)]
            if metric else None,
            "split": {k: [str(it["image"]) for it in split.get(k, [])] for k in ("training", "validation", "test")},
            "history": epochs}


def labelled_scans(dataset_dir: Path) -> dict[str, tuple[str, Path]]:
    """``{name: (image, label map)}`` for the CT volumes with a TotalSegmentator ``labels.nii.gz`` beside them."""
    out = {}
    for labels in sorted(dataset_dir.glob("*/labels.nii.gz")):
        folder = labels.parent
        image = folder / "ct.nii.gz" if (folder / "ct.nii.gz").is_file() else folder / "slices"
        if image.exists():
            out[folder.name] = (str(image), labels)
    return out


def centroids(labels: Path) -> dict[str, np.ndarray]:
    """World (RAS mm) centroid of each organ of :data:`ORGANS` present in the label map."""
    import nibabel as nib

    img = nib.load(str(labels))
    data = np.asarray(img.dataobj)
    out = {}
    for label, organ in ORGANS.items():
        idx = np.argwhere(data == label)
        if len(idx) >= 50:  # a few stray voxels are not an organ
            out[organ] = (idx @ img.affine[:3, :3].T + img.affine[:3, 3]).mean(0)
    return out


def registration_baselines(scans: dict[str, tuple[str, Path]], pixdim: float, window: Sequence[float]
                           ) -> dict[tuple[str, str], tuple[Any, Any, np.ndarray, np.ndarray]]:
    """SimpleITK affine registration (``sam_landmarks.affine_registration``: moments initialisation, Mattes MI) of
    every ordered pair on the model's grids: ``{(a, b): (affine, centre of mass, grid a's affine, grid b's)}``."""
    from sam_landmarks import affine_registration, load_grid

    grids = {name: load_grid(image, pixdim, window) for name, (image, _) in scans.items()}
    return {(a, b): (*affine_registration(grids[a][0], grids[b][0], pixdim), grids[a][1], grids[b][1])
            for a in grids for b in grids if a != b}


def landmark_search(sam_run: Path, export: Path, dataset_dir: Path) -> dict[str, Any]:
    from sam_landmarks import map_through, to_index, to_world

    from medsim.deploy.landmark import find_landmarks
    from medsim.export.pipeline import export_run

    scans = labelled_scans(dataset_dir)
    marks = {name: centroids(lab) for name, (_, lab) in scans.items()}
    prep = json.loads((sam_run / "run.json").read_text())["eval_preprocessing"]
    pixdim = float(np.mean(prep.get("pixdim", [2.0])))
    window = prep.get("hu_window", [-1000.0, 1000.0])
    t0 = time.perf_counter()
    registered = registration_baselines(scans, pixdim, window)
    registration_seconds = (time.perf_counter() - t0) / max(len(registered), 1)
    t0 = time.perf_counter()
    export_run(sam_run / "last.pt", export, opt_batch=1)
    export_seconds = time.perf_counter() - t0
    rows, seconds = [], []
    for a, (image_a, _) in scans.items():
        for b, (image_b, _) in scans.items():
            if a == b:
                continue
            tx, com, aff_a, aff_b = registered[(a, b)]
            for organ in [o for o in marks[a] if o in marks[b]]:
                idx = to_index(marks[a][organ], aff_a)[None]
                by = {k: float(np.linalg.norm(to_world(map_through(t, idx, pixdim)[0], aff_b) - marks[b][organ]))
                      for k, t in (("affine_mm", tx), ("centre_of_mass_mm", com))}
                t1 = time.perf_counter()
                found = find_landmarks(str(export), image_a, marks[a][organ].tolist(), [image_b])[0]
                seconds.append(time.perf_counter() - t1)
                truth = marks[b][organ]
                rows.append({"template": a, "target": b, "organ": organ, "found_mm": found["point_mm"],
                             "score": round(float(found["score"]), 4),
                             "error_mm": round(float(np.linalg.norm(np.asarray(found["point_mm"]) - truth)), 2),
                             "no_search_mm": round(float(np.linalg.norm(marks[a][organ] - truth)), 2),
                             **{k: round(v, 2) for k, v in by.items()}})
    return {"export_seconds": round(export_seconds, 1), "registration_seconds": round(registration_seconds, 1),
            "pixdim": pixdim, "window": window, "seconds_per_search": round(float(np.median(seconds)), 2)
            if seconds else None, "scans": {k: v[0].split(str(dataset_dir) + "/")[-1] for k, v in scans.items()},
            "rows": rows}


def write(doc: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=float))
    lines = ["# The 3-D bundles on the real CT of `../shared/data/ct`", "", "```", *doc["commands"], doc["command"],
             "```", "", "## Training", "",
             "| run | bundle | epochs | s per epoch (median) | loss first → last | validation metric first → last "
             "(best) | training / validation / test volumes |", "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        m = r["metric_first_last_best"]
        lines.append(f"| `{r['run']}` | {r['bundle']} | {r['epochs']} | {r['seconds_per_epoch']:.1f} | "
                     f"{r['loss'][0]:.3f} → {r['loss'][1]:.3f} | {r['metric']} {m[0]:.4g} → {m[1]:.4g} ({m[2]:.4g}) | "
                     + " / ".join(", ".join(r["split"][k]) or "–" for k in ("training", "validation", "test")) + " |")
    sam = doc.get("landmarks")
    if sam:
        train = set(next((r["split"]["training"] for r in doc["runs"] if r["metric"] == "val_match"), []))
        lines += ["", "## SAM export: organ centroids across the scans (torch-free, whole volumes)", "",
                  f"Export {sam['export_seconds']} s; one search (both volumes embedded + the search) "
                  f"{sam['seconds_per_search']} s (median). Error = found point vs the target's own centroid "
                  "(TotalSegmentator labels). Baselines: the point mapped through a SimpleITK affine registration "
                  f"of the two volumes (`sam_landmarks.affine_registration`, on {sam.get('pixdim')} mm grids, window "
                  f"{sam.get('window')}; {sam.get('registration_seconds')} s per pair), through its moments "
                  "(centre-of-mass) initialisation alone, and *no search*: the template's world point taken as it is "
                  "(scanners place the origin anywhere).", "",
                  "| template → target | organ | SAM error mm | affine registration mm | centre of mass mm | "
                  "no search mm | similarity |", "|---|---|---|---|---|---|---|"]
        for r in sam["rows"]:
            seen = lambda n: n + (" (trained on)" if any(t.startswith(n + "/") for t in train) else "")  # noqa: E731
            lines.append(f"| {seen(r['template'])} → {seen(r['target'])} | {r['organ']} | {r['error_mm']:.1f} | "
                         f"{r.get('affine_mm', float('nan')):.1f} | {r.get('centre_of_mass_mm', float('nan')):.1f} | "
                         f"{r['no_search_mm']:.1f} | {r['score']:.3f} |")
        if sam["rows"]:
            lines += [""] + [f"- {label}: median {np.median([r[k] for r in sam['rows']]):.1f} mm, mean "
                             f"{np.mean([r[k] for r in sam['rows']]):.1f} mm over {len(sam['rows'])} landmarks"
                             for k, label in (("error_mm", "SAM"), ("affine_mm", "affine registration"),
                                              ("centre_of_mass_mm", "centre of mass"), ("no_search_mm", "no search"))
                             if all(k in r for r in sam["rows"])]
    md = out.with_suffix(".md")
    reading = md.read_text()[md.read_text().index("\n## Reading"):] if md.is_file() and "\n## Reading" in \
        md.read_text() else ""
    md.write_text("\n".join(lines) + "\n" + reading)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="finished run folders (ct_sam first if any)")
    ap.add_argument("--dataset-dir", default=str(ROOT.parent / "shared" / "data" / "ct"))
    ap.add_argument("--commands", nargs="*", default=[], help="the training commands, recorded as given")
    ap.add_argument("--export", default="/tmp/medsim_ct_real_export", help="where the SAM run is exported")
    ap.add_argument("--out", default="benchmarks/results/ct_real")
    args = ap.parse_args(argv)
    runs = [run_summary(Path(r)) for r in args.runs]
    doc: dict[str, Any] = {"command": "python benchmarks/ct_real.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                   else list(argv)),
                           "commands": args.commands, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                           "runs": runs}
    sam = next((Path(r["run"]) for r in runs if r["metric"] == "val_match"), None)
    if sam is not None:
        doc["landmarks"] = landmark_search(sam, Path(args.export), Path(args.dataset_dir))
    write(doc, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
