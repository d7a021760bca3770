"""INT8 ONNX models with ``onnxruntime.quantization`` and what they cost in retrieval quality.

* ``static``: weights *and* activations in int8 (QDQ format, per-channel weights); activation ranges come from
  calibration images run through the fp32 model (min/max calibration). The faster CPU model; needs
  representative, preprocessed calibration images.
* ``dynamic``: int8 weights, activation ranges computed at run time; no calibration data, less speed-up for
  convolutional networks.

:func:`compare_retrieval` measures R@1 (leave-one-out, :func:`medsim.metrics.retrieval.recall_at_k`) of the
fp32 and int8 embeddings of the same images, so the manifest records what quantization cost.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from medsim.export.errors import ExportError, check_choice

__all__ = ["QUANT_MODES", "quantize_onnx", "compare_retrieval", "retrieval_change", "quantization_step",
           "NumpyCalibrationReader"]

logger = logging.getLogger(__name__)

QUANT_MODES = ("static", "dynamic")


def _ort_quant():
    try:
        import onnxruntime.quantization as q
    except ImportError as e:
        raise ExportError("onnxruntime is not installed (INT8 quantization uses onnxruntime.quantization): "
                          "pip install 'medsim[cpu]'") from e
    return q


def NumpyCalibrationReader(images: np.ndarray, input_name: str = "image", batch: int = 8):
    """A ``onnxruntime.quantization.CalibrationDataReader`` over preprocessed images (N, C, *S) float32,
    yielding ``{input_name: (b, C, *S)}`` batches of at most ``batch``. Rewindable."""
    q = _ort_quant()

    class _Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.images = np.ascontiguousarray(images, dtype=np.float32)
            self._it: Iterator[dict[str, np.ndarray]] | None = None

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            for i in range(0, len(self.images), batch):
                yield {input_name: self.images[i:i + batch]}

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._it is None:
                self._it = self._batches()
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = None

        def __len__(self) -> int:
            return (len(self.images) + batch - 1) // batch

    return _Reader()


@contextlib.contextmanager
def quantization_step(src: Path, what: str, temporaries: Sequence[Path]) -> Iterator[None]:
    """Run a quantizer: its failure becomes one :class:`ExportError` naming ``src``, ``what`` failed and the
    quantizer's first message line; the ``temporaries`` are deleted whatever happens."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime, OpenVINO and NNCF raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"{src}: {what} failed ({type(e).__name__}: {first})") from e
    finally:
        for p in temporaries:
            if p.exists():
                p.unlink()


def quantize_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike, *, mode: str = "static",
                  calibration_images: np.ndarray | None = None, per_channel: bool = True,
                  max_calibration: int = 256, calibration_batch: int = 8) -> Path:
    """Write an INT8 version of an fp32 ONNX model (atomically: temporary file + ``os.replace``).

    Args:
        onnx_path: the fp32 model (input ``image``, float32 (batch, C, *S)).
        out_path: where the int8 model goes (e.g. ``model.int8.onnx``).
        mode: ``"static"`` (needs ``calibration_images``) or ``"dynamic"``.
        calibration_images: preprocessed (N, C, *S) float32 images, as the model sees them; the first
            ``max_calibration`` are used.
        per_channel: per-output-channel weight scales (static mode).

    Raises:
        ExportError: unknown mode (with a suggestion), missing/ill-shaped calibration images, or a quantizer
            failure (named with the model file).
    """
    q = _ort_quant()
    check_choice(mode, QUANT_MODES, "quantization mode")
    src, out = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise ExportError(f"{src}: not found — export the fp32 ONNX model first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.onnx")
    prep = out.with_name(f".{out.stem}.prep{os.getpid()}.onnx")
    with quantization_step(src, f"{mode} INT8 quantization", (tmp, prep)):
        if mode == "static" and (calibration_images is None or len(calibration_images) == 0):
            raise ExportError(f"{src}: static INT8 quantization needs calibration images (preprocessed "
                              "(N, C, *S) float32); pass calibration_images or use mode='dynamic'")
        try:  # shape inference + graph optimisation first, as onnxruntime recommends before quantizing
            q.quant_pre_process(str(src), str(prep), skip_symbolic_shape=False)
            model_in = prep
        except Exception as e:  # noqa: BLE001 - optional step
            logger.info("quant_pre_process failed (%s); quantizing the model as exported", e)
            model_in = src
        if mode == "static":
            cal = np.asarray(calibration_images, dtype=np.float32)[:max_calibration]
            input_name = _input_name(src)
            q.quantize_static(str(model_in), str(tmp), NumpyCalibrationReader(cal, input_name, calibration_batch),
                              quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax)
        else:
            q.quantize_dynamic(str(model_in), str(tmp), weight_type=q.QuantType.QInt8)
        os.replace(tmp, out)
    return out


def _input_name(onnx_path: Path) -> str:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ExportError(f"{onnx_path}: expected one graph input, found {names}")
    return names[0]


def compare_retrieval(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, images: np.ndarray,
                      labels: np.ndarray, *, batch: int = 32) -> dict[str, Any]:
    """R@1 (leave-one-out, cosine) of fp32 and int8 embeddings (onnxruntime) of the same images, and how far they
    moved: :func:`retrieval_change`."""
    from medsim.export.onnx_export import ort_session, run_onnx

    e32 = run_onnx(ort_session(fp32_path), images, batch=batch, names=["embedding"])["embedding"]
    e8 = run_onnx(ort_session(int8_path), images, batch=batch, names=["embedding"])["embedding"]
    return retrieval_change(e32, e8, labels)


def retrieval_change(reference: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, *, name: str = "int8"
                     ) -> dict[str, Any]:
    """R@1 (leave-one-out, cosine, :func:`medsim.metrics.retrieval.recall_at_k`) of fp32 ``reference`` and
    ``embeddings`` (another engine or precision, ``name``) of the same images, and how far the embeddings moved.

    Returns ``{"images", "R@1_fp32", "R@1_<name>", "R@1_delta" (<name> - fp32), "embedding_max_abs_diff",
    "embedding_mean_cosine", "recheck"}``; the R@1 values are ``None`` with fewer than 2 images. ``recheck``: the
    fp32-recheck margin of a search with these embeddings against an fp32 index
    (:func:`medsim.runtime.ties.calibrate_recheck`; ``None`` with too few images).
    """
    from medsim.metrics.retrieval import recall_at_k
    from medsim.runtime.ties import calibrate_recheck

    e32, eq = np.asarray(reference, dtype=np.float32), np.asarray(embeddings, dtype=np.float32)
    res: dict[str, Any] = {"images": int(len(e32))}
    if len(e32) >= 2:
        r32 = recall_at_k(e32, labels, ks=1)["R@1"]
        rq = recall_at_k(eq, labels, ks=1)["R@1"]
        res.update({"R@1_fp32": round(r32, 6), f"R@1_{name}": round(rq, 6), "R@1_delta": round(rq - r32, 6)})
    else:
        res.update({"R@1_fp32": None, f"R@1_{name}": None, "R@1_delta": None})
    n32 = e32 / np.maximum(np.linalg.norm(e32, axis=1, keepdims=True), 1e-12)
    nq = eq / np.maximum(np.linalg.norm(eq, axis=1, keepdims=True), 1e-12)
    res["embedding_max_abs_diff"] = float(np.abs(e32 - eq).max()) if e32.size else 0.0
    res["embedding_mean_cosine"] = float((n32 * nq).sum(1).mean()) if e32.size else 1.0
    # searching an fp32 index with these embeddings: the margin below which a query is re-embedded in fp32
    res["recheck"] = calibrate_recheck(e32, eq) if e32.size else None
    return res
