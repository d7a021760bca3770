"""SAM landmark error in millimetres on real MR (issue 14, part 5): trained SAM vs random-init SAM vs affine
registration (SimpleITK, Mattes mutual information).

1. **Training**: ``bundles/ct_sam`` through ``medsim train``'s ``train_bundle`` on the training volumes of
   ``mr_chaos`` (split by volume, written before training so that more volumes are held out than the bundle's
   70/15/15), at ``--pixdim`` mm with a fixed intensity window (``intensity=hu``, ``hu_window=--window``: the CHAOS
   T2-SPIR volumes are already intensity-normalised by their source, 0 to ~1000, and a fixed window is what the
   torch-free runtime reproduces, so the run exports). The **last** checkpoint is evaluated (``best.pt`` is chosen on
   the validation volumes, which are evaluated here too). ``random`` is the same SAMNet with fresh weights.
2. Every held-out volume (validation + test) is put on its **whole-volume model grid** (the training loading: RAS,
   ``pixdim`` resampling, window; no crop: SAMNet is fully convolutional) and embedded once per model.
3. **(a) Known synthetic deformations**: per held-out volume V, a random affine (rotation, scale, shift about the grid
   centre) plus a smooth elastic displacement (random control grid, trilinear) gives ``T``; the deformed volume is
   ``D(y) = V(T(y))`` (trilinear). Random body voxels ``y`` of D have the exact partner ``x = T(y)`` in V; each method
   maps ``x`` from V into D and the error is the distance to ``y``. ``identity`` (the point left where it is) shows
   the size of the deformation.
4. **(b) Across patients**: landmarks from each held-out volume's manual label map (world mm, from the original
   label file): organ centroids (liver, kidneys, spleen), the top of the liver and the upper / lower poles of both
   kidneys (centroid of the organ's voxels within ``--slab`` mm of its most superior / inferior extent). Every
   ordered pair (template, target) of held-out volumes: the template's landmark → found point in the target vs the
   target's own landmark. ``centre of mass`` is the registration's initial translation alone.
5. **SAM search** is ``medsim.ssl.match_points`` (the rule of the torch-free ``medsim.deploy.landmark.match_point``:
   argmax over the local cells of local + upsampled global cosine similarity). **Affine registration**: the
   template's grid is the fixed image, the target's the moving one (moments initialisation, Mattes MI, shrink 4 and 2);
   the transform maps template points into the target.
6. **Torch-free check**: the trained run is exported (``medsim export``) and one across-patient query runs through
   ``medsim.deploy.landmark.find_landmarks``; compared with PyTorch on the same (centre-cropped) model grid, and with
   the whole-volume answer above.

    python benchmarks/sam_landmarks.py --dataset-dir ../shared/data/mr_chaos --epochs 30 --amp --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ham_recipe import command_line, rerender, write_results  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ct_sam"
ORGANS = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
#: extreme points: (organ label, "top" = most superior / "bottom" = most inferior)
EXTREMES = {"liver_top": (1, "top"), "right_kidney_upper_pole": (2, "top"), "right_kidney_lower_pole": (2, "bottom"),
            "left_kidney_upper_pole": (3, "top"), "left_kidney_lower_pole": (3, "bottom")}
METHODS = ("sam", "random", "affine")


# ----------------------------------------------------------------------------------------------- pure helpers
def random_deformation(shape: Sequence[int], pixdim: float, rng: np.random.Generator, *, rotate_deg: float = 10.0,
                       scale: float = 0.1, shift_mm: float = 10.0, elastic_mm: float = 6.0, control: int = 5
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
    """A random smooth deformation of a grid of ``shape`` (x, y, z) voxels of ``pixdim`` mm.

    Returns ``T`` (X, Y, Z, 3) float64: the voxel-index coordinates (voxel k centred at k) in the original volume
    that each voxel of the deformed volume shows, ``T(y) = c + A (y - c) + t + u(y)``: ``A`` a rotation (up to
    ``rotate_deg`` per axis) times a scaling (``1 ± scale`` per axis), ``c`` the grid centre, ``t`` a shift (up to
    ``shift_mm`` per axis), ``u`` a smooth field (normal, std ``elastic_mm`` at the nodes of a ``control``³ grid over
    the volume, trilinear between them). Also its parameters and the field's RMS size in mm."""
    angles = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = r @ rot
    matrix = rot @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    shift = rng.uniform(-shift_mm, shift_mm, 3) / pixdim
    centre = (np.asarray(shape, np.float64) - 1) / 2
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    c = torch.as_tensor(centre)
    field = c + (grid - c) @ torch.as_tensor(matrix).T + torch.as_tensor(shift)
    nodes = torch.as_tensor(rng.normal(0.0, elastic_mm / pixdim, size=(1, 3, control, control, control)))
    elastic = torch.nn.functional.interpolate(nodes, size=tuple(int(n) for n in shape), mode="trilinear",
                                              align_corners=True)[0].permute(1, 2, 3, 0)
    params = {"rotation_deg": np.rad2deg(angles).round(2).tolist(), "matrix": matrix.round(4).tolist(),
              "shift_mm": (shift * pixdim).round(2).tolist(),
              "elastic_rms_mm": round(float(elastic.norm(dim=-1).pow(2).mean().sqrt()) * pixdim, 2)}
    return field + elastic, params


def deform(volume: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """The deformed volume ``D(y) = volume(field[y])`` (C, X, Y, Z), trilinear, zero outside the original."""
    from medsim.data.views3d import sample_volume

    return sample_volume(volume.double(), field).to(volume.dtype)


def organ_landmarks(labels: np.ndarray, affine: np.ndarray, *, slab_mm: float = 3.0) -> dict[str, np.ndarray]:
    """World (RAS mm) landmarks of a label map (x, y, z) with its voxel → world ``affine``: each organ's centroid
    (:data:`ORGANS`) and the extreme points of :data:`EXTREMES` (the centroid of the organ's voxels within ``slab_mm``
    of its highest / lowest superior coordinate). Organs absent from the map are left out."""
    out: dict[str, np.ndarray] = {}
    world: dict[int, np.ndarray] = {}
    for label, name in ORGANS.items():
        idx = np.argwhere(labels == label)
        if len(idx):
            world[label] = idx @ affine[:3, :3].T + affine[:3, 3]
            out[name] = world[label].mean(0)
    for name, (label, end) in EXTREMES.items():
        if label in world:
            s = world[label][:, 2]
            keep = s >= s.max() - slab_mm if end == "top" else s <= s.min() + slab_mm
            out[name] = world[label][keep].mean(0)
    return out


def summarise(errors: Sequence[float]) -> dict[str, float]:
    """mean / median / p90 / max of distances in mm, and their number."""
    e = np.asarray(errors, dtype=np.float64)
    return {"mean": round(float(e.mean()), 2), "median": round(float(np.median(e)), 2),
            "p90": round(float(np.percentile(e, 90)), 2), "max": round(float(e.max()), 2), "n": int(e.size)}


# ------------------------------------------------------------------------------------------------ the methods
def load_grid(path: str, pixdim: float, window: Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
    """A volume on its whole-volume model grid (1, X, Y, Z) in [0, 1] (the training loading) and that grid's
    voxel-index → world (RAS mm) affine."""
    import monai.transforms as mt

    from medsim.data.transforms import volume_loading

    load = mt.Compose(volume_loading(pixdim=(pixdim,) * 3, intensity="hu", hu_window=tuple(window)))
    img = load({"image": path})["image"]
    return img.as_tensor().float(), np.asarray(img.affine, dtype=np.float64)


@torch.no_grad()
def embed(network: torch.nn.Module, volume: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SAMNet's global and local maps of one volume (1, X, Y, Z), fp32."""
    out = network(volume[None])
    return {"global": out["global"], "local": out["local"]}


def sam_match(network: torch.nn.Module, source: Mapping[str, torch.Tensor], source_size: Sequence[int],
              points: np.ndarray, target: Mapping[str, torch.Tensor], target_size: Sequence[int]) -> np.ndarray:
    """``medsim.ssl.match_points`` between two embedded volumes: voxel-index ``points`` (P, 3) of the source grid →
    (P, 3) voxel-index points of the target grid."""
    from medsim.ssl.sam import map_grid, match_points

    pred = {n: [source[n], target[n]] for n in ("global", "local")}
    pred["grid"] = {n: [map_grid(network, n, source_size), map_grid(network, n, target_size)]
                    for n in ("global", "local")}
    found = match_points(pred, torch.as_tensor(points, dtype=torch.float32)[None])
    return found[0].double().numpy()


def sitk_image(volume: torch.Tensor, pixdim: float) -> Any:
    """A (1, X, Y, Z) grid as a SimpleITK image in grid millimetres (index × pixdim, no rotation)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(volume[0].numpy().astype(np.float32).transpose(2, 1, 0).copy())
    img.SetSpacing((float(pixdim),) * 3)
    return img


def affine_registration(fixed: torch.Tensor, moving: torch.Tensor, pixdim: float, *, seed: int = 0,
                        iterations: int = 300) -> tuple[Any, Any]:
    """Affine registration of two grids (SimpleITK: moments initialisation, Mattes MI with 32 bins on 20 % random
    samples, regular-step gradient descent with physical-shift scales, up to 300 iterations at each of shrink 4 and 2;
    on a known affine + elastic deformation it came within 0.3 mm of the best affine fit to the true
    correspondences). Returns (the transform mapping fixed grid
    mm → moving grid mm, the initial centre-of-mass transform)."""
    import SimpleITK as sitk

    f, m = sitk_image(fixed, pixdim), sitk_image(moving, pixdim)
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])  # a full-resolution level cost 5-10x the time for no gain in (a)
    reg.SetSmoothingSigmasPerLevel([2, 1])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(f, m), sitk.AffineTransform(init)


def map_through(transform: Any, points: np.ndarray, pixdim: float) -> np.ndarray:
    """Voxel-index points (P, 3) of the fixed grid → voxel-index points of the moving grid."""
    return np.array([transform.TransformPoint(tuple(float(v) for v in p * pixdim)) for p in points]) / pixdim


def to_index(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(affine) @ np.append(world, 1.0))[:3]


def to_world(index: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.asarray(index, np.float64) @ affine[:3, :3].T + affine[:3, 3]


# ------------------------------------------------------------------------------------------------ experiments
def body_points(deformed: torch.Tensor, field: torch.Tensor, original: torch.Tensor, n: int, threshold: float,
                rng: np.random.Generator) -> np.ndarray:
    """``n`` random voxels ``y`` (P, 3) of the deformed grid inside the body (both ``D(y)`` and the original at
    ``T(y)`` above ``threshold``, ``T(y)`` at least one voxel inside the original)."""
    size = torch.tensor(original.shape[1:], dtype=field.dtype)
    inside = ((field >= 1) & (field <= size - 2)).all(-1)
    ok = inside & (deformed[0] > threshold) & (original[0].double()[tuple(
        field.round().long().clamp_min(0).minimum(size.long() - 1).unbind(-1))] > threshold)
    idx = np.argwhere(ok.numpy())
    return idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)].astype(np.float64)


def synthetic(volumes: dict[str, tuple[torch.Tensor, np.ndarray]], nets: Mapping[str, torch.nn.Module],
              args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    errors: dict[str, list[float]] = {m: [] for m in (*METHODS, "identity")}
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    per_volume = []
    for name, (vol, _) in volumes.items():
        field, params = random_deformation(vol.shape[1:], args.pixdim, rng, rotate_deg=args.rotate,
                                           scale=args.scale, shift_mm=args.shift, elastic_mm=args.elastic)
        dvol = deform(vol, field)
        y = body_points(dvol, field, vol, args.points, args.body_threshold, rng)
        x = field[tuple(torch.as_tensor(y, dtype=torch.long).unbind(-1))].numpy()  # exact partners in V
        found: dict[str, np.ndarray] = {"identity": x}
        for m, net in nets.items():
            t0 = time.perf_counter()
            src, tgt = embed(net, vol), embed(net, dvol)
            found[m] = sam_match(net, src, vol.shape[1:], x, tgt, dvol.shape[1:])
            seconds[m].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tx, _ = affine_registration(vol, dvol, args.pixdim, seed=args.seed)
        found["affine"] = map_through(tx, x, args.pixdim)
        seconds["affine"].append(time.perf_counter() - t0)
        row = {"volume": name, "deformation": params, "n_points": len(y)}
        for m, f in found.items():
            e = np.linalg.norm(f - y, axis=1) * args.pixdim
            errors[m] += e.tolist()
            row[m] = round(float(e.mean()), 2)
        per_volume.append(row)
        print(f"  (a) {name}: " + ", ".join(f"{m} {row[m]:.1f}" for m in found), flush=True)
    return {"summary": {m: summarise(e) for m, e in errors.items()},
            "seconds_per_pair": {m: round(float(np.mean(s)), 2) for m, s in seconds.items()},
            "per_volume": per_volume}


def across_patients(volumes: dict[str, tuple[torch.Tensor, np.ndarray]], marks: dict[str, dict[str, np.ndarray]],
                    nets: Mapping[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    emb = {m: {} for m in nets}
    embed_seconds = {m: [] for m in nets}
    for m, net in nets.items():
        for name, (vol, _) in volumes.items():
            t0 = time.perf_counter()
            emb[m][name] = embed(net, vol)
            embed_seconds[m].append(time.perf_counter() - t0)
    methods = (*METHODS, "centre_of_mass")
    errors: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    seconds: dict[str, list[float]] = {m: [] for m in (*METHODS,)}
    found_rows = []
    names = list(volumes)
    for a in names:
        for b in names:
            if a == b:
                continue
            (va, aff_a), (vb, aff_b) = volumes[a], volumes[b]
            keys = [k for k in marks[a] if k in marks[b]]
            pts = np.array([to_index(marks[a][k], aff_a) for k in keys])
            found: dict[str, np.ndarray] = {}
            for m, net in nets.items():
                t0 = time.perf_counter()
                found[m] = sam_match(net, emb[m][a], va.shape[1:], pts, emb[m][b], vb.shape[1:])
                seconds[m].append(time.perf_counter() - t0 + 2 * float(np.mean(embed_seconds[m])))
            t0 = time.perf_counter()
            tx, init = affine_registration(va, vb, args.pixdim, seed=args.seed)
            found["affine"] = map_through(tx, pts, args.pixdim)
            seconds["affine"].append(time.perf_counter() - t0)
            found["centre_of_mass"] = map_through(init, pts, args.pixdim)
            for m, f in found.items():
                for k, p in zip(keys, f):
                    e = float(np.linalg.norm(to_world(p, aff_b) - marks[b][k]))
                    errors[m].setdefault(k, []).append(e)
                    found_rows.append({"template": a, "target": b, "landmark": k, "method": m, "error_mm": round(e, 2)})
        print(f"  (b) template {a}: " + ", ".join(
            f"{m} {np.mean([r['error_mm'] for r in found_rows if r['template'] == a and r['method'] == m]):.1f}"
            for m in methods), flush=True)
    centroids = list(ORGANS.values())
    extremes = list(EXTREMES)
    out: dict[str, Any] = {"pairs": len(names) * (len(names) - 1)}
    for group, keys in (("centroids", centroids), ("extremes", extremes), ("all", centroids + extremes)):
        out[group] = {m: summarise([e for k in keys for e in errors[m].get(k, [])]) for m in methods}
    out["per_landmark"] = {m: {k: round(float(np.mean(v)), 2) for k, v in errors[m].items()} for m in methods}
    out["seconds_per_pair"] = {m: round(float(np.mean(s)), 2) for m, s in seconds.items()}
    out["embed_seconds_per_volume"] = {m: round(float(np.mean(s)), 2) for m, s in embed_seconds.items()}
    out["errors"] = found_rows
    return out


def torch_free_check(run: Path, export: Path, items: Sequence[dict], marks: Mapping[str, Mapping[str, np.ndarray]],
                     network: torch.nn.Module, volumes: Mapping[str, Any]) -> dict[str, Any]:
    """Export ``run`` (its last checkpoint) and find every landmark of one held-out template in another held-out
    volume with the torch-free ``find_landmarks`` on whole volumes (the export's dynamic spatial axes), compared
    with PyTorch's ``match_points`` on the same whole-volume grids, and with the training-crop search
    (``crop=True``), which can only take the landmarks inside the centre crop."""
    from medsim.deploy.landmark import find_landmarks
    from medsim.export.pipeline import export_run
    from medsim.runtime.errors import DeployError
    from medsim.runtime.volume import whole_grid

    t0 = time.perf_counter()
    export_run(run / "last.pt", export, opt_batch=1)
    export_seconds = time.perf_counter() - t0
    manifest = json.loads((export / "manifest.json").read_text())
    prep, dyn = manifest["preprocessing"], manifest["dynamic_spatial"]
    (a, path_a), (b, path_b) = [(it["name"], it["image"]) for it in items[:2]]
    grids = [whole_grid(p, prep, multiple=dyn["multiple"], min_size=dyn["min_size"]) for p in (path_a, path_b)]
    (grid_a, aff_a), (grid_b, aff_b) = grids
    ta, tb = torch.from_numpy(grid_a)[None], torch.from_numpy(grid_b)[None]
    ea, eb = embed(network, ta), embed(network, tb)
    keys = [k for k in marks[a] if k in marks[b]]
    t0 = time.perf_counter()
    rows = {k: find_landmarks(str(export), path_a, marks[a][k], [path_b])[0] for k in keys}
    onnx_seconds = (time.perf_counter() - t0) / max(len(keys), 1)
    out_rows, crop_found = [], 0
    for k in keys:
        pt = sam_match(network, ea, ta.shape[1:], to_index(marks[a][k], aff_a)[None], eb, tb.shape[1:])[0]
        torch_mm = to_world(pt, aff_b)
        try:
            crop = find_landmarks(str(export), path_a, marks[a][k], [path_b], crop=True)[0]["point_mm"]
            crop_found += 1
        except DeployError:  # outside the template's centre crop
            crop = None
        truth = marks[b][k]
        out_rows.append({"landmark": k, "onnx_mm": rows[k]["point_mm"], "score": round(rows[k]["score"], 4),
                         "pytorch_mm": np.round(torch_mm, 3).tolist(),
                         "onnx_vs_pytorch_mm": round(float(np.linalg.norm(np.asarray(rows[k]["point_mm"]) - torch_mm)), 3),
                         "error_mm": round(float(np.linalg.norm(np.asarray(rows[k]["point_mm"]) - truth)), 2),
                         "crop_error_mm": None if crop is None else round(float(np.linalg.norm(np.asarray(crop) - truth)), 2)})
    return {"template": a, "target": b, "whole_grid": [list(grid_a.shape), list(grid_b.shape)],
            "crop_input": dyn["min_size"], "landmarks": out_rows, "crop_searchable": crop_found,
            "max_onnx_vs_pytorch_mm": max(r["onnx_vs_pytorch_mm"] for r in out_rows),
            "export_seconds": round(export_seconds, 1), "find_landmarks_seconds": round(onnx_seconds, 2)}


# ------------------------------------------------------------------------------------------------------ main
def train(args: argparse.Namespace, run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split by volume (written first, reused by the bundle), then train ct_sam; returns the split and the cost."""
    from medsim.data.volumes import volume_datalists
    from medsim.engines.workflow import train_bundle

    if run.exists() and not (args.keep or args.eval_only):
        shutil.rmtree(run)
    lists = volume_datalists(args.dataset_dir, run, fractions=tuple(args.fractions), seed=args.seed)
    overrides = {"max_epochs": args.epochs, "items_per_epoch": args.items_per_epoch, "batch_size": args.batch_size,
                 "image_size": list(args.image_size), "pixdim": [args.pixdim] * 3, "intensity": "hu",
                 "hu_window": list(args.window), "learning_rate": args.lr, "amp": bool(args.amp), "seed": args.seed,
                 "split_seed": args.seed, "train#output_handlers#0#_disabled_": True,
                 "train#output_handlers#1#_disabled_": True}
    t0 = time.time()
    res = None if args.eval_only else train_bundle(BUNDLE, dataset_dir=args.dataset_dir, output_dir=str(run),
                                                   overrides=overrides)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    if args.eval_only:
        overrides = json.loads((run / "run.json").read_text())["overrides"]
    return {"overrides": {k: v for k, v in overrides.items() if "#" not in k},
            "seconds": round(sum(r["seconds"] for r in recs) if args.eval_only else time.time() - t0, 1),
            "epochs": len(recs), "seconds_per_epoch": [r["seconds"] for r in recs],
            "loss": [round(r["loss"], 3) for r in recs], "val_match": [r["val_match"] for r in recs],
            "val_match_error": [r["val_match_error"] for r in recs], "test_crops": res,
            "split": {k: [Path(it["image"]).name.split(".")[0] for it in lists[k]]
                      for k in ("training", "validation", "test")}}, lists


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-dir", required=True, help="mr_chaos (imagesTr/ + labelsTr/)")
    ap.add_argument("--out", default="benchmarks/results/sam_landmarks")
    ap.add_argument("--work", default="runs/sam_landmarks", help="run + export folders (deleted first)")
    ap.add_argument("--keep", action="store_true", help="resume / reuse the run in --work")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the finished run in --work/run, no training")
    ap.add_argument("--fractions", type=float, nargs=3, default=[0.6, 0.13, 0.27],
                    help="training / validation / test volumes (15 volumes: 9 / 2 / 4)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--items-per-epoch", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, nargs=3, default=[48, 48, 32])
    ap.add_argument("--pixdim", type=float, default=3.0)
    ap.add_argument("--window", type=float, nargs=2, default=[0.0, 1000.0])
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast in training (the bundle's amp)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--points", type=int, default=200, help="(a) random body points per held-out volume")
    ap.add_argument("--body-threshold", type=float, default=0.05, help="(a) body: windowed intensity above this")
    ap.add_argument("--rotate", type=float, default=10.0, help="(a) rotation, degrees per axis, up to")
    ap.add_argument("--scale", type=float, default=0.1, help="(a) scaling 1 ± this per axis")
    ap.add_argument("--shift", type=float, default=10.0, help="(a) shift, mm per axis, up to")
    ap.add_argument("--elastic", type=float, default=6.0, help="(a) elastic node displacement std, mm")
    ap.add_argument("--slab", type=float, default=3.0, help="(b) extreme points: organ voxels within this many mm")
    ap.add_argument("--report-from", default=None, help="only re-render <out>.md from a saved results JSON")
    ap.add_argument("--torch-free-only", action="store_true",
                    help="re-run only the torch-free check on the finished run in --work/run and replace that part "
                         "of <out>.json (the other parts and their command are kept)")
    args = ap.parse_args(argv)
    if rerender(args, report):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    import nibabel as nib

    from medsim.engines.runs import build_spec, load_run_record
    from medsim.export.run import load_run

    t_start = time.time()
    work = Path(args.work)
    run = work / "run"
    if args.torch_free_only:
        return refresh_torch_free(args, run, work / "export", argv)
    print("training SAM ...", flush=True)
    training, lists = train(args, run)
    trained = load_run(run / "last.pt").network.eval()
    torch.manual_seed(args.seed)
    random = build_spec(load_run_record(run)["network"]).eval()
    nets = {"sam": trained, "random": random}

    held = [{"name": Path(it["image"]).name.split(".")[0], "image": it["image"]}
            for it in lists["validation"] + lists["test"]]
    volumes, marks = {}, {}
    for it in held:
        volumes[it["name"]] = load_grid(it["image"], args.pixdim, args.window)
        lab = nib.load(str(Path(it["image"]).parent.parent / "labelsTr" / Path(it["image"]).name))
        marks[it["name"]] = organ_landmarks(np.asarray(lab.dataobj), lab.affine, slab_mm=args.slab)
    print("(a) synthetic deformations ...", flush=True)
    t0 = time.time()
    syn = synthetic(volumes, nets, args)
    syn["seconds"] = round(time.time() - t0, 1)
    print("(b) across patients ...", flush=True)
    t0 = time.time()
    cross = across_patients(volumes, marks, nets, args)
    cross["seconds"] = round(time.time() - t0, 1)
    print("torch-free check ...", flush=True)
    export = work / "export"
    if export.exists():
        shutil.rmtree(export)
    check = torch_free_check(run, export, held, marks, trained, volumes)
    doc = {"command": command_line(argv), "title": "SAM landmark error on mr_chaos (issue 14, part 5)",
           "config": {k: v for k, v in vars(args).items() if k not in ("report_from",)},
           "torch": torch.__version__, "threads": torch.get_num_threads(), "training": training,
           "held_out": [it["name"] for it in held],
           "grid_shapes": {n: list(v.shape[1:]) for n, (v, _) in volumes.items()},
           "synthetic": syn, "across_patients": cross, "torch_free": check,
           "total_seconds": round(time.time() - t_start, 1), "reading": ""}
    return write_results(args.out, doc, report)


def refresh_torch_free(args: argparse.Namespace, run: Path, export: Path, argv: list[str] | None) -> int:
    """``--torch-free-only``: the torch-free check of the saved results' first two held-out volumes, on the run
    that made them (its last checkpoint), written over ``<out>.json``'s ``torch_free`` part."""
    import nibabel as nib

    from medsim.export.run import load_run

    out = Path(args.out).with_suffix(".json")
    doc = json.loads(out.read_text())
    held = [{"name": n, "image": str(Path(args.dataset_dir) / "imagesTr" / f"{n}.nii.gz")}
            for n in doc["held_out"][:2]]
    marks = {}
    for it in held:
        lab = nib.load(str(Path(args.dataset_dir) / "labelsTr" / f"{it['name']}.nii.gz"))
        marks[it["name"]] = organ_landmarks(np.asarray(lab.dataobj), lab.affine, slab_mm=args.slab)
    if export.exists():
        shutil.rmtree(export)
    trained = load_run(run / "last.pt").network.eval()
    doc["torch_free"] = torch_free_check(run, export, held, marks, trained, {})
    doc["torch_free"]["command"] = command_line(argv)
    return write_results(args.out, doc, report)


# ---------------------------------------------------------------------------------------------------- report
_NAMES = {"sam": "SAM (trained)", "random": "SAM architecture, random init",
          "affine": "affine registration (SimpleITK MI)", "identity": "identity (no search: size of the deformation)",
          "centre_of_mass": "centre-of-mass translation (registration's start)"}


def _table(summary: Mapping[str, Mapping[str, float]], seconds: Mapping[str, float], order: Sequence[str]
           ) -> list[str]:
    lines = ["| method | mean mm | median mm | p90 mm | max mm | points | s per volume pair |",
             "|---|---|---|---|---|---|---|"]
    for m in order:
        s = summary[m]
        t = seconds.get(m)
        lines.append(f"| {_NAMES[m]} | {s['mean']:.1f} | {s['median']:.1f} | {s['p90']:.1f} | {s['max']:.1f} | "
                     f"{s['n']} | {'' if t is None else f'{t:.1f}'} |")
    return lines


def report(doc: dict) -> str:
    cfg, tr, syn, cross = doc["config"], doc["training"], doc["synthetic"], doc["across_patients"]
    chk = doc["torch_free"]
    spe = tr["seconds_per_epoch"]
    steps = cfg["items_per_epoch"] // cfg["batch_size"]
    lines = [f"# {doc['title']}", "", f"Command: `{doc['command']}`", "",
             "Data: `mr_chaos` (15 T2-SPIR MR volumes, 1.25×1.25×7.7 mm, manual liver / kidney / spleen labels), "
             f"split by volume: {len(tr['split']['training'])} training ({', '.join(tr['split']['training'])}), "
             f"{len(tr['split']['validation'])} validation, {len(tr['split']['test'])} test; the "
             f"{len(doc['held_out'])} held-out volumes ({', '.join(doc['held_out'])}) are evaluated. "
             f"torch {doc['torch']}, {doc['threads']} CPU thread(s); whole benchmark "
             f"{doc['total_seconds'] / 60:.1f} min.",
             "",
             "## SAM training (`bundles/ct_sam` via `train_bundle`)", "",
             f"Crops {'×'.join(map(str, cfg['image_size']))} voxels at {cfg['pixdim']:g} mm isotropic "
             f"({'×'.join(str(int(v * cfg['pixdim'])) for v in cfg['image_size'])} mm), window {cfg['window']} "
             f"(`intensity=hu`), batch {cfg['batch_size']}, {steps} steps per epoch, {tr['epochs']} epochs, "
             f"Adam lr {cfg['lr']:g}, {'bf16 autocast' if cfg['amp'] else 'fp32'}. "
             f"**{np.mean(spe):.1f} s per epoch** (median {np.median(spe):.1f}; {np.mean(spe) / steps:.2f} s per "
             f"step incl. validation), {tr['seconds'] / 60:.1f} min in all. Loss {tr['loss'][0]} → {tr['loss'][-1]}; "
             f"val_match (label-free crop matching within one local stride) {tr['val_match'][0]} → "
             f"{tr['val_match'][-1]} (max {max(tr['val_match'])}). Evaluated: the last checkpoint.", "",
             "## (a) Known synthetic deformations (exact correspondences)", "",
             f"Per held-out volume: rotation up to ±{cfg['rotate']:g}° per axis, scaling 1 ± {cfg['scale']:g}, "
             f"shift up to ±{cfg['shift']:g} mm, plus a smooth elastic field (node std {cfg['elastic']:g} mm on a 5³ "
             f"control grid; RMS {np.mean([r['deformation']['elastic_rms_mm'] for r in syn['per_volume']]):.1f} mm "
             f"after interpolation); {cfg['points']} random body points per volume. Errors in mm on the "
             f"{cfg['pixdim']:g} mm grid; SAM's answers are local-cell centres (stride 2 voxels = "
             f"{2 * cfg['pixdim']:g} mm), so even a perfect match is off by ~{0.48 * 2 * cfg['pixdim']:.1f} mm on "
             "average.", "",
             *_table(syn["summary"], syn["seconds_per_pair"], ("sam", "random", "affine", "identity")), "",
             "## (b) Across patients: organ landmarks from the manual labels", "",
             f"Every ordered pair of the {len(doc['held_out'])} held-out volumes ({cross['pairs']} pairs); the "
             "template's landmark → found point in the target vs the target's own landmark (world mm). SAM time per "
             "pair = both volumes embedded + the search; embedding alone "
             + ", ".join(f"{_NAMES[m]} {s:.1f} s" for m, s in cross["embed_seconds_per_volume"].items())
             + " per volume.", ""]
    order = ("sam", "random", "affine", "centre_of_mass")
    for group, title in (("centroids", "Organ centroids (liver, right / left kidney, spleen)"),
                         ("extremes", "Extreme points (top of the liver, upper / lower kidney poles)"),
                         ("all", "All nine landmarks")):
        lines += [f"**{title}**", "", *_table(cross[group], cross["seconds_per_pair"], order), ""]
    keys = list(cross["per_landmark"]["sam"])
    lines += ["Mean error per landmark (mm):", "", "| landmark | " + " | ".join(_NAMES[m] for m in order) + " |",
              "|---|" + "---|" * len(order)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{cross['per_landmark'][m].get(k, float('nan')):.1f}" for m in order)
                     + " |")
    lines += ["", "## Torch-free path (`medsim export` → `medsim.deploy.landmark.find_landmarks`)", "",
              f"Template {chk['template']} → target {chk['target']}, every landmark, whole volumes "
              f"(model grids {' and '.join('×'.join(map(str, g)) for g in chk['whole_grid'])}): the ONNX export in "
              f"the torch-free `find_landmarks` vs PyTorch `match_points` on the same grids: **largest distance "
              f"{chk['max_onnx_vs_pytorch_mm']} mm** over {len(chk['landmarks'])} landmarks. The training-crop "
              f"search (`--crop`, a {'×'.join(map(str, chk['crop_input']))} centre crop) can take "
              f"{chk['crop_searchable']} of them. Export {chk['export_seconds']} s, find_landmarks "
              f"{chk['find_landmarks_seconds']} s per landmark."
              + (f" Re-run alone on the same trained run: `{chk['command']}`." if chk.get("command") else ""), "",
              "| landmark | ONNX found (mm) | PyTorch found (mm) | apart (mm) | error, whole (mm) | error, crop (mm) |",
              "|---|---|---|---|---|---|",
              *[f"| {r['landmark']} | {r['onnx_mm']} | {r['pytorch_mm']} | {r['onnx_vs_pytorch_mm']} | "
                f"{r['error_mm']} | {'outside the crop' if r['crop_error_mm'] is None else r['crop_error_mm']} |"
                for r in chk["landmarks"]], ""]
    if doc.get("reading"):
        lines += ["## Reading", "", doc["reading"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
