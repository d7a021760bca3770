"""``medsim export`` as one library call: ONNX + manifest first, then the optional INT8 ONNX, TensorRT engine
and Triton repository, each recorded in ``manifest.json``.

Every option — TensorRT's presence included — is checked before anything is written or removed: ``--trt`` on a
host without TensorRT or a GPU fails with one clear message and leaves ``out_dir`` as it was (an earlier export's
INT8 model and Triton folder are only replaced once the new export can be completed).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medsim.export.cpu_engines import OV_INT8_BIN, OV_INT8_NAME
from medsim.export.errors import ExportError, ExportParityError, TensorRTUnavailable, check_choice
from medsim.export.manifest import MANIFEST_NAME, read_manifest, update_manifest

__all__ = ["export_run", "check_options", "INT8_NAME", "ENGINE_NAME", "TRT_FP32_ATOL"]

logger = logging.getLogger(__name__)

INT8_NAME = "model.int8.onnx"
ENGINE_NAME = "model.plan"
#: fp32 engines (TF32 off) must match onnxruntime this closely; fp16/int8 diffs are recorded, not enforced
TRT_FP32_ATOL = 1e-3


def export_run(source: str | os.PathLike, out_dir: str | os.PathLike, *, onnx: bool = True, trt: bool = False,
               precision: str = "fp32", calib_split: str = "training", quantize: str | None = None,
               triton: bool = False, opset: int = 17, opt_batch: int = 8, max_batch: int = 32,
               workspace_mb: int = 2048, atol: float = 1e-4, triton_name: str | None = None,
               triton_kind: str = "gpu", max_calibration: int = 256,
               calib: str | os.PathLike | None = None, profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a run (directory or checkpoint) into ``out_dir``.

    Steps (each adds a section to ``manifest.json``):

    1. ``onnx``: ``model.onnx`` + ``manifest.json`` with parity vs PyTorch at batch 1 and ``opt_batch``
       (:func:`~medsim.export.onnx_export.export_onnx`). ``onnx=False`` reuses an earlier export in ``out_dir``.
    2. INT8 ONNX (``quantize`` static/dynamic, or ``precision="int8"`` without ``trt``): ``model.int8.onnx``,
       calibrated on ``calib_split`` of the run — or the images of ``calib`` (a folder, or a split JSON's
       ``calib_split``) — (static), R@1 fp32 vs int8 on the validation split → manifest ``int8``.
    2b. CPU engines, where ``openvino`` is installed (required with ``quantize="openvino"``): OpenVINO fp32 parity
       vs PyTorch, bf16 and (``quantize="openvino"``) the NNCF INT8 model ``model.ov-int8.xml`` calibrated like step
       2, each with its embedding cosine and R@1 change → manifest ``openvino``; then a short interleaved timing of
       every CPU engine that passed → manifest ``cpu_timing`` (what ``--backend auto`` picks from).
    3. ``trt``: ``model.plan`` (``precision`` fp32/fp16/int8, batch profile 1/``opt_batch``/``max_batch``) →
       manifest ``tensorrt``; on hosts without TensorRT or a GPU :class:`~medsim.export.errors.TensorRTUnavailable`
       is raised before step 1, with nothing written or removed.
    4. ``triton``: ``out_dir/triton/<name>/`` for the engine (with ``trt``) or the ONNX model (the INT8 one when
       step 2 ran and ``triton_kind="cpu"``) → manifest ``triton``.
    5. ``profile`` (the record of an export profile, :meth:`~medsim.export.profiles.ExportProfile.record`, given
       when the options came from one) → manifest ``export_profile``. Without one, an ``export_profile`` left by an
       earlier call (``onnx=False`` keeps the manifest) is set to ``null``: the section always describes the call
       that last wrote the manifest.

    Returns:
        ``{"out_dir", "files": {...}, "manifest": dict, "lines": [human-readable summary lines]}``.

    Raises:
        ExportError (and subclasses): bad options (checked before any work), a missing earlier export with
        ``onnx=False``, parity failures, TensorRT unavailable.
    """
    from medsim.export.tensorrt import require_tensorrt

    check_options(onnx=onnx, trt=trt, precision=precision, quantize=quantize, calib_split=calib_split,
                  triton=triton, triton_kind=triton_kind, opset=opset, opt_batch=opt_batch, max_batch=max_batch,
                  workspace_mb=workspace_mb, max_calibration=max_calibration, calib=calib)
    if trt:  # that TensorRT can run here, before spending time on ONNX
        try:
            require_tensorrt()
        except TensorRTUnavailable as e:  # a new model.onnx would make the folder's INT8/engine/Triton stale
            raise TensorRTUnavailable(f"{e}; nothing in {out_dir} was changed (export without --trt to write the "
                                      "ONNX model)") from e
    int8_onnx = _int8_onnx(quantize, precision, trt)
    ov_int8 = quantize == "openvino"
    if ov_int8:  # before anything is written
        from medsim.export.cpu_engines import require_openvino

        require_openvino(nncf=True)

    out = Path(out_dir)
    files: dict[str, str] = {}
    lines: list[str] = []
    state: dict[str, Any] = {"run": None}

    def run_():  # opened once, only when a step needs images or weights
        if state["run"] is None:
            from medsim.export.run import load_run, sha256_file

            state["run"] = load_run(source)
            if not onnx:
                want = read_manifest(out).get("source", {}).get("sha256")
                have = sha256_file(state["run"].checkpoint)
                if want and want != have:
                    raise ExportError(f"{out / MANIFEST_NAME}: was exported from another checkpoint than "
                                      f"{state['run'].checkpoint} (sha256 {want[:12]}… vs {have[:12]}…); "
                                      "re-export without --no-onnx")
        return state["run"]

    # 1. ONNX + manifest
    if onnx:
        from medsim.export.onnx_export import export_onnx

        res = export_onnx(run_(), out, opset=opset, batch=opt_batch, atol=atol)
        manifest = res["manifest"]
        stale = _remove_stale(out)
        if stale:
            lines.append(f"removed   {', '.join(stale)} of an earlier export (built from the previous model.onnx)")
        d = manifest["parity"]["max_abs_diff"]
        lines.append(f"onnx      {res['onnx_path']}  (opset {manifest['opset']}, {manifest['exporter']} exporter; "
                     f"parity vs PyTorch on {manifest['parity']['images']} image(s): "
                     + ", ".join(f"{k} {v:.2g}" for k, v in d.items()) + ")")
    else:
        manifest = read_manifest(out)
        if not (out / manifest.get("model", "model.onnx")).is_file():
            raise ExportError(f"{out / 'model.onnx'}: not found — run without --no-onnx first")
        lines.append(f"onnx      {out / manifest['model']}  (reused)")
    files["onnx"] = str(out / manifest["model"])
    files["manifest"] = str(out / MANIFEST_NAME)

    # 2. INT8 ONNX (onnxruntime)
    if int8_onnx:
        from medsim.export.quantize import compare_retrieval, quantize_onnx
        from medsim.export.run import split_images

        mode = quantize or "static"
        run = run_()
        cal = cal_split = None
        if mode == "static":
            cal, cal_split = _calibration_images(run, calib, calib_split, max_calibration)
        path = quantize_onnx(out / manifest["model"], out / INT8_NAME, mode=mode, calibration_images=cal,
                             max_calibration=max_calibration)
        val, labels, val_split = split_images(run, "validation")
        cmp = compare_retrieval(out / manifest["model"], path, val, labels)
        section = {"model": INT8_NAME, "mode": mode, "format": "QDQ" if mode == "static" else "dynamic (integer ops)",
                   "calibration": ({"split": cal_split, "images": int(len(cal))} if cal is not None else None),
                   "evaluation_split": val_split, **cmp}
        manifest = update_manifest(out, int8=section)
        files["int8"] = str(path)
        r = (f"R@1 fp32 {cmp['R@1_fp32']:.4f} → int8 {cmp['R@1_int8']:.4f} (Δ {cmp['R@1_delta']:+.4f})"
             if cmp["R@1_fp32"] is not None else "R@1 n/a (fewer than 2 validation images)")
        lines.append(f"int8      {path}  ({mode}; {r} on {cmp['images']} {val_split} image(s){_recheck_text(cmp)})")

    # 2b. OpenVINO (fp32 parity, bf16, NNCF INT8) and the CPU timing `--backend auto` reads
    if ov_int8 or ((onnx or int8_onnx) and _openvino_installed()):
        manifest = _cpu_engines(out, manifest, run_(), lines, files, ov_int8=ov_int8, onnx=onnx, calib=calib,
                                calib_split=calib_split, max_calibration=max_calibration, atol=atol,
                                opt_batch=opt_batch)

    # 3. TensorRT
    if trt:
        section = _build_trt(out, manifest, run_, precision=precision, calib=calib, calib_split=calib_split,
                             opt_batch=opt_batch,
                             max_batch=max_batch, workspace_mb=workspace_mb, max_calibration=max_calibration)
        manifest = update_manifest(out, tensorrt=section)
        files["engine"] = str(out / ENGINE_NAME)
        lines.append(f"tensorrt  {out / ENGINE_NAME}  ({precision}, batch 1/{opt_batch}/{max_batch})")

    # 4. Triton
    if triton:
        from medsim.export.triton import write_triton_repository

        name = triton_name or _model_name(source)
        platform = "tensorrt_plan" if trt else "onnxruntime_onnx"
        kind = "KIND_GPU" if trt else f"KIND_{triton_kind.upper()}"
        served = out / INT8_NAME if (int8_onnx and not trt and triton_kind == "cpu") else out
        repo = out / "triton"
        folder = write_triton_repository(served, repo, name=name, platform=platform, max_batch_size=max_batch,
                                         preferred_batch_sizes=sorted({opt_batch, max_batch}), kind=kind)
        manifest = update_manifest(out, triton={"repository": "triton", "name": name, "platform": platform,
                                                "kind": kind, "max_batch_size": max_batch,
                                                "model": ENGINE_NAME if trt else (served.name if served != out
                                                                                  else manifest["model"])})
        files["triton"] = str(folder)
        lines.append(f"triton    {folder}  ({platform}, {kind}; serve with tritonserver --model-repository {repo})")

    # 5. the export profile the options came from
    if profile is not None:
        manifest = update_manifest(out, export_profile=profile)
        extra = f"; from the command line: {', '.join(profile['command_line'])}" if profile["command_line"] else ""
        lines.append(f"profile   {profile['name']}  ({profile['file']}{extra})")
    elif manifest.get("export_profile") is not None:
        manifest = update_manifest(out, export_profile=None)
    lines.append(f"manifest  {out / MANIFEST_NAME}")
    return {"out_dir": str(out), "files": files, "manifest": manifest, "lines": lines}


def check_options(*, onnx: bool = True, trt: bool = False, precision: str = "fp32", quantize: str | None = None,
                  calib_split: str = "training", triton: bool = False, triton_kind: str = "gpu", opset: int = 17,
                  opt_batch: int = 8, max_batch: int = 32, workspace_mb: int = 2048, max_calibration: int = 256,
                  calib: str | os.PathLike | None = None) -> None:
    """Refuse an inconsistent set of :func:`export_run` options, before any work, with one
    :class:`~medsim.export.errors.ExportError` naming the option and the fix. Export profiles are checked with it
    too (:mod:`medsim.export.profiles`). Whether TensorRT can run on this host is not checked here
    (:func:`~medsim.export.tensorrt.require_tensorrt` is)."""
    from medsim.export.tensorrt import PRECISIONS, TrtBuildConfig

    check_choice(precision, PRECISIONS, "precision")
    check_choice(quantize, ("static", "dynamic", "openvino"), "quantization mode")
    check_choice(calib_split, ("training", "validation", "test"), "calibration split")
    check_choice(triton_kind, ("gpu", "cpu"), "Triton instance kind")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: medsim exports need ONNX opset >= 17 (LayerNormalization, "
                          "the attention heads' ops and TensorRT 10's parser all assume it)")
    if triton and trt and triton_kind == "cpu":
        raise ExportError("--triton-kind cpu cannot serve a TensorRT engine (GPU only); drop --trt or use gpu")
    if calib is not None and not Path(calib).exists():
        raise ExportError(f"{calib}: calibration data not found (a folder of images or a split JSON)")
    if precision == "fp16" and not trt:
        raise ExportError("--precision fp16 needs --trt (fp16 is a TensorRT build option; onnxruntime CPU gains "
                          "nothing from fp16): add --trt, or use --precision int8 for a CPU INT8 model")
    if max_calibration < 1:
        raise ExportError(f"the number of calibration images must be >= 1, got {max_calibration}")
    if trt:  # the TensorRT optimisation profile
        TrtBuildConfig(precision=precision, min_batch=1, opt_batch=opt_batch, max_batch=max_batch,
                       workspace_mb=workspace_mb)
    elif opt_batch < 1 or max_batch < opt_batch:
        raise ExportError(f"batch sizes need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, "
                          f"max_batch={max_batch}")
    int8_onnx = _int8_onnx(quantize, precision, trt)
    if not (onnx or trt or int8_onnx or quantize == "openvino" or triton):
        raise ExportError("nothing to do: --no-onnx without --trt, --quantize/--precision int8 or --triton")


def _int8_onnx(quantize: str | None, precision: str, trt: bool) -> bool:
    """Whether the export writes the onnxruntime INT8 model (``--quantize static|dynamic``, or ``--precision int8``
    without ``--trt`` unless ``--quantize openvino`` asks for OpenVINO's instead)."""
    return quantize in ("static", "dynamic") or (precision == "int8" and not trt and quantize != "openvino")


def _openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _cpu_engines(out: Path, manifest: dict[str, Any], run: Any, lines: list[str], files: dict[str, str], *,
                 ov_int8: bool, onnx: bool, calib: str | os.PathLike | None, calib_split: str, max_calibration: int,
                 atol: float, opt_batch: int) -> dict[str, Any]:
    """Step 2b of :func:`export_run`: the manifest's ``openvino`` and ``cpu_timing`` sections (see there). An
    OpenVINO failure other than in an asked-for ``--quantize openvino`` is logged and recorded, not fatal: the
    onnxruntime export stands and ``auto`` keeps to onnxruntime."""
    from medsim.export.cpu_engines import check_openvino, quantize_openvino, time_engines
    from medsim.export.onnx_export import ort_session, run_onnx
    from medsim.export.run import split_images
    from medsim.runtime.runners import OrtRunner

    val, labels, val_split = split_images(run, "validation")
    fp32_path = out / manifest["model"]
    reference = run_onnx(ort_session(fp32_path), val, batch=32, names=["embedding"])["embedding"]
    int8_xml = None
    if ov_int8:
        cal, cal_split = _calibration_images(run, calib, calib_split, max_calibration)
        int8_xml = quantize_openvino(fp32_path, out / OV_INT8_NAME, cal, max_calibration=max_calibration)
        calibration = {"split": cal_split, "images": int(len(cal))}
    elif not onnx and ((manifest.get("openvino") or {}).get("int8") and (out / OV_INT8_NAME).is_file()):
        int8_xml, calibration = out / OV_INT8_NAME, manifest["openvino"]["int8"].get("calibration")
    try:
        section, runners = check_openvino(fp32_path, run.network, val[:32], val, labels, reference=reference,
                                          atol=atol, batch=opt_batch, int8_xml=int8_xml)
    except ExportError as e:
        if ov_int8:
            raise
        logger.warning("OpenVINO checks failed (auto keeps to onnxruntime): %s", e)
        return update_manifest(out, openvino={"error": str(e)}, cpu_timing=None)
    if int8_xml is not None:
        section["int8"].update(calibration=calibration, evaluation_split=val_split)
        files["openvino_int8"] = str(int8_xml)
    section["evaluation_split"] = val_split
    runners["ort-cpu/fp32"] = OrtRunner(ort_session(fp32_path))
    if manifest.get("int8") and (out / manifest["int8"]["model"]).is_file():
        runners["ort-cpu/int8"] = OrtRunner(ort_session(out / manifest["int8"]["model"]))
    try:
        timing = time_engines(runners, val, batch=opt_batch)
    finally:
        for r in runners.values():
            r.close()
    manifest = update_manifest(out, openvino=section, cpu_timing=timing)
    ok = {p: section[p] for p in ("fp32", "bf16", "int8") if p in section}
    lines.append("openvino  " + "; ".join(
        f"{p} " + ("failed" if not s.get("passed") else
                   f"parity {max(s['max_abs_diff'].values()):.2g}" if p == "fp32" else
                   f"cosine {s['embedding_mean_cosine']:.5f}, R@1 Δ {s['R@1_delta']:+.4f}{_recheck_text(s)}"
                   if s.get("R@1_delta") is not None else f"cosine {s['embedding_mean_cosine']:.5f}")
        + (f" ({s['unavailable']})" if s.get("unavailable") else "") for p, s in ok.items())
        + (f"  → {int8_xml}" if int8_xml is not None else ""))
    rates = timing["images_per_s"]
    lines.append(f"cpu time  batch {timing['batch']}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in
                                                                     sorted(rates.items(), key=lambda kv: -kv[1])))
    return manifest


def _recheck_text(check: dict[str, Any]) -> str:
    """``, fp32 recheck margin …`` for a summary line: what `medsim search` at this precision re-embeds in fp32."""
    rec = check.get("recheck")
    if not rec:
        return ""
    if rec["method"] == "all":
        return f", fp32 recheck of every query ({rec['images']} validation images are too few to calibrate)"
    k = "5" if "5" in rec["by_k"] else next(iter(rec["by_k"]))
    share = rec["by_k"][k]["recheck_share"]
    return f", fp32 recheck margin {rec['margin']:.2g} ({rec['method']}: {share:.0%} of top-{k} queries)"


def _calibration_images(run: Any, calib: str | os.PathLike | None, split: str, limit: int
                        ) -> tuple[np.ndarray, str]:
    """INT8 calibration images, preprocessed as in evaluation: ``calib`` (a folder of images, or split ``split``
    of a split JSON) when given, else split ``split`` of the run. Returns ``(images (N, C, *S), description)``."""
    from medsim.export.run import preprocess_items, split_images

    if calib is None:
        cal, _, used = split_images(run, split, limit=limit)
        return cal, used
    from medsim.data.splits import case_items
    from medsim.errors import DataError

    try:
        items = case_items(calib, split=split)[:limit]
    except DataError as e:
        raise ExportError(f"calibration data: {e}") from e
    return preprocess_items(items, run.transform), str(calib)


#: files and folders derived from model.onnx: a new model.onnx makes them stale (the fresh manifest no longer lists
#: them, and a host with TensorRT must never pick up an engine of the previous weights)
DERIVED = (INT8_NAME, ENGINE_NAME, "trt_int8_calibration.cache", "triton", OV_INT8_NAME, OV_INT8_BIN)


def _remove_stale(out: Path) -> list[str]:
    """Delete what an earlier export in ``out`` derived from its model.onnx; returns the names removed. In
    ``triton/`` only the model folders medsim wrote (they hold a copy of its manifest) go; other models in the
    repository stay, and the folder itself goes only when nothing else is left in it."""
    import shutil

    removed = []
    for name in DERIVED:
        p = out / name
        if name == "triton":
            if not p.is_dir() or p.is_symlink():
                continue
            ours = [d for d in p.iterdir() if d.is_dir() and (d / MANIFEST_NAME).is_file()]
            for d in ours:
                shutil.rmtree(d)
            if ours and not any(p.iterdir()):
                p.rmdir()
                removed.append(name)
            else:
                removed += [f"{name}/{d.name}" for d in ours]
            continue
        if p.exists() or p.is_symlink():
            p.unlink()
            removed.append(name)
    return removed


def _model_name(source: str | os.PathLike) -> str:
    p = Path(source)
    stem = (p if p.is_dir() else p.parent).resolve().name
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", stem).strip("._-")
    return name or "medsim"


def _build_trt(out: Path, manifest: dict[str, Any], run_: Any, *, precision: str, calib: str | os.PathLike | None,
               calib_split: str, opt_batch: int, max_batch: int, workspace_mb: int, max_calibration: int) -> dict[str, Any]:
    """Build ``model.plan`` and compare it with onnxruntime fp32 on the validation split (GPU hosts)."""
    from medsim.export.onnx_export import ort_session, run_onnx
    from medsim.export.run import split_images
    from medsim.export.tensorrt import TrtBuildConfig, build_engine, make_int8_calibrator, require_tensorrt, \
        run_engine

    trt = require_tensorrt()  # raises TensorRTUnavailable here, with model.onnx and manifest.json already written
    cfg = TrtBuildConfig.from_manifest(manifest, precision=precision, min_batch=1, opt_batch=opt_batch,
                                       max_batch=max_batch, workspace_mb=workspace_mb)
    calibrator = None
    section: dict[str, Any] = {"model": ENGINE_NAME, **cfg.to_dict(), "tensorrt_version": trt.__version__}
    if precision == "int8":
        cal, used = _calibration_images(run_(), calib, calib_split, max_calibration)
        calibrator = make_int8_calibrator(cal, batch=opt_batch, cache_file=out / "trt_int8_calibration.cache")
        section["calibration"] = {"split": used, "images": int(len(cal))}
    engine = build_engine(out / manifest["model"], out / ENGINE_NAME, cfg, calibrator=calibrator)
    val, labels, split = split_images(run_(), "validation")
    got = run_engine(engine, val, batch=min(opt_batch, max_batch))
    ref = run_onnx(ort_session(out / manifest["model"]), val, batch=opt_batch)
    diffs = {n: float(np.abs(got[n] - ref[n]).max()) for n in ref if n in got}
    section["parity_vs_onnxruntime"] = {"split": split, "images": int(len(val)), "max_abs_diff": diffs}
    if len(val) >= 2:
        from medsim.metrics.retrieval import recall_at_k

        section["R@1_onnx_fp32"] = recall_at_k(ref["embedding"], labels, ks=1)["R@1"]
        section["R@1_engine"] = recall_at_k(got["embedding"], labels, ks=1)["R@1"]
    try:
        import torch

        section["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - informational
        pass
    bad = {n: d for n, d in diffs.items() if not np.isfinite(d) or (precision == "fp32" and d > TRT_FP32_ATOL)}
    if bad:
        n, d = next(iter(bad.items()))
        raise ExportParityError(f"{engine}: TensorRT {precision} output '{n}' differs from onnxruntime by {d:.3g} "
                                f"(atol {TRT_FP32_ATOL:g}); do not deploy this engine", output=n, diff=d,
                                atol=TRT_FP32_ATOL, batch=opt_batch)
    return section
