"""CPU engines of an export beside onnxruntime: OpenVINO on the same ONNX file (fp32, bf16) and its NNCF INT8 model,
each checked against the fp32 model, and a short timing that lets ``--backend auto`` pick the fastest.

* fp32 OpenVINO must match PyTorch like onnxruntime does (:func:`~medsim.export.onnx_export.check_parity`, the
  same ``atol``);
* bf16 and INT8 change the numbers on purpose: they pass when the embeddings' mean cosine to fp32 is at least
  :data:`MIN_COSINE` and R@1 on the validation split drops by at most :data:`MAX_R1_DROP`
  (:func:`~medsim.export.quantize.retrieval_change`);
* :func:`time_engines` runs a few interleaved rounds of batch 8 through every engine that passed and records
  images/s in the manifest (``cpu_timing``), which :func:`medsim.deploy.engine.timed_cpu_backend` reads.

The OpenVINO INT8 model is post-training quantized by NNCF (``nncf.quantize``) on the export's calibration images,
preprocessed as in evaluation, and saved as OpenVINO IR (``model.ov-int8.xml`` + ``.bin``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from medsim.export.errors import ExportError, ExportParityError

__all__ = ["OV_INT8_NAME", "OV_INT8_BIN", "MIN_COSINE", "MAX_R1_DROP", "require_openvino", "quantize_openvino",
           "check_openvino", "time_engines"]

logger = logging.getLogger(__name__)

OV_INT8_NAME = "model.ov-int8.xml"
OV_INT8_BIN = "model.ov-int8.bin"
#: smallest mean embedding cosine to fp32 that a reduced-precision engine may have and still be used by ``auto``
MIN_COSINE = {"bf16": 0.99, "int8": 0.95}
#: largest R@1 drop (fraction, validation split) a reduced-precision engine may cost and still be used by ``auto``
MAX_R1_DROP = 0.01


def require_openvino(*, nncf: bool = False) -> Any:
    """The ``openvino`` module (and that ``nncf`` imports, with ``nncf=True``), or :class:`ExportError` naming
    the missing package and how to install it."""
    from medsim.runtime.errors import BackendUnavailable
    from medsim.runtime.runners import import_openvino

    try:
        ov = import_openvino()
    except BackendUnavailable as e:
        raise ExportError(str(e)) from e
    if nncf:
        try:
            import nncf as _nncf  # noqa: F401
        except ImportError as e:
            raise ExportError(f"nncf is not installed ({e}); OpenVINO INT8 (--quantize openvino) needs it: "
                              "pip install 'medsim[openvino]'") from e
    return ov


def quantize_openvino(onnx_path: str | os.PathLike, out_xml: str | os.PathLike, calibration_images: np.ndarray,
                      *, max_calibration: int = 256) -> Path:
    """NNCF post-training INT8 quantization of the fp32 ONNX model, read by OpenVINO, calibrated on
    ``calibration_images`` (preprocessed (N, C, *S) float32, the first ``max_calibration``); writes OpenVINO IR
    ``out_xml`` + its ``.bin`` atomically (temporary files + ``os.replace``, ``.bin`` first).

    Raises:
        ExportError: openvino/nncf missing, no calibration images, or an NNCF failure (named with the model file).
    """
    ov = require_openvino(nncf=True)
    import nncf

    from medsim.export.quantize import quantization_step

    src, out = Path(onnx_path), Path(out_xml)
    cal = np.ascontiguousarray(np.asarray(calibration_images, dtype=np.float32)[:max_calibration])
    if cal.ndim < 3 or len(cal) == 0:
        raise ExportError(f"{src}: OpenVINO INT8 quantization needs calibration images (preprocessed (N, C, *S) "
                          f"float32), got shape {cal.shape}")
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.xml")
    tmp_bin, out_bin = tmp.with_suffix(".bin"), out.with_suffix(".bin")
    with quantization_step(src, "OpenVINO (NNCF) INT8 quantization", (tmp, tmp_bin)):
        model = ov.Core().read_model(str(src))
        dataset = nncf.Dataset([cal[i:i + 1] for i in range(len(cal))])
        quantized = nncf.quantize(model, dataset, subset_size=len(cal))
        ov.save_model(quantized, str(tmp), compress_to_fp16=False)
        os.replace(tmp_bin, out_bin)
        os.replace(tmp, out)
    return out


def _reduced(name: str, runner: Any, reference: np.ndarray, images: np.ndarray, labels: np.ndarray,
             batch: int) -> dict[str, Any]:
    """A bf16/int8 engine's retrieval change against the fp32 embeddings ``reference``, and whether it passes."""
    from medsim.export.quantize import retrieval_change
    from medsim.runtime.runners import run_batched

    emb = run_batched(runner, images, batch)["embedding"]
    res = retrieval_change(reference, emb, labels, name=name)
    drop_ok = res["R@1_delta"] is None or res["R@1_delta"] >= -MAX_R1_DROP
    res["passed"] = bool(res["embedding_mean_cosine"] >= MIN_COSINE[name] and drop_ok)
    res["criteria"] = {"min_mean_cosine": MIN_COSINE[name], "max_R@1_drop": MAX_R1_DROP}
    return res


def check_openvino(onnx_path: str | os.PathLike, network: Any, parity_images: np.ndarray, val_images: np.ndarray,
                   labels: np.ndarray, *, reference: np.ndarray, atol: float = 1e-4, batch: int = 8,
                   int8_xml: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenVINO's checks of one export: fp32 parity vs PyTorch on ``parity_images`` (batch 1 and ``batch``, the
    same ``atol`` as onnxruntime), and for bf16 (where the CPU has it) and the INT8 model ``int8_xml`` (when given)
    the retrieval change on ``val_images``/``labels`` against the fp32 embeddings ``reference``.

    Returns:
        ``(section, runners)``: the manifest's ``openvino`` section (``{"version", "fp32": {"passed", ...},
        "bf16": {...} | {"passed": False, "unavailable": why}, "int8": {"model", ...}}``) and the runners of the
        engines that passed, by ``"openvino/<precision>"`` (for :func:`time_engines`; the caller closes them).
    """
    from medsim.export.onnx_export import check_parity
    from medsim.runtime.runners import OvRunner, openvino_missing

    ov = require_openvino()
    section: dict[str, Any] = {"version": str(ov.get_version())}
    runners: dict[str, Any] = {}
    fp32 = OvRunner(onnx_path, "fp32")
    try:
        section["fp32"] = {"passed": True, **check_parity(onnx_path, network, parity_images, atol=atol,
                                                           batch_sizes=sorted({1, int(batch)}), runner=fp32,
                                                           engine="OpenVINO fp32")}
        runners["openvino/fp32"] = fp32
    except ExportParityError as e:  # onnxruntime passed: the export stands, auto just never picks OpenVINO
        logger.warning("OpenVINO fp32 parity failed (auto will not use it): %s", e)
        section["fp32"] = {"passed": False, "error": str(e)}
    missing = openvino_missing("bf16")
    if missing:
        section["bf16"] = {"passed": False, "unavailable": "; ".join(missing)}
    else:
        bf16 = OvRunner(onnx_path, "bf16")
        section["bf16"] = _reduced("bf16", bf16, reference, val_images, labels, batch)
        if section["bf16"]["passed"]:
            runners["openvino/bf16"] = bf16
    if int8_xml is not None:
        int8 = OvRunner(int8_xml, "fp32")
        section["int8"] = {"model": Path(int8_xml).name, **_reduced("int8", int8, reference, val_images, labels,
                                                                     batch)}
        if section["int8"]["passed"]:
            runners["openvino/int8"] = int8
    return section, runners


def time_engines(runners: dict[str, Any], images: np.ndarray, *, batch: int = 8, rounds: int = 3,
                 calls: int = 3) -> dict[str, Any]:
    """Images/s of each runner (``{"<backend>/<precision>": runner}``) on one batch of ``batch`` of ``images``:
    ``rounds`` interleaved rounds (every engine once per round, so load on the machine hits all alike) of ``calls``
    timed calls after one warm-up; the median round is recorded.

    Returns ``{"batch", "rounds", "calls", "threads", "images_per_s": {key: float}}``.
    """
    from medsim.threads import configured_threads

    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])), dtype=np.float32)
    for r in runners.values():
        r(x)  # warm-up: first-call allocations and OpenVINO's lazy compilation out of the timing
    per: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(int(rounds)):
        for key, r in runners.items():
            t0 = time.perf_counter()
            for _ in range(int(calls)):
                r(x)
            per[key].append(batch * calls / (time.perf_counter() - t0))
    return {"batch": int(batch), "rounds": int(rounds), "calls": int(calls), "threads": configured_threads(),
            "images_per_s": {k: round(float(np.median(v)), 2) for k, v in per.items()}}
