"""Embeddings (and attention maps) from an exported model, on the best backend this host can actually run.

``EmbeddingEngine(model_dir)`` reads ``manifest.json`` and the model files written by ``medsim export`` and picks:

1. ``tensorrt`` — ``model.plan`` exists, ``tensorrt`` and ``cuda-python`` import, a CUDA device is visible and the
   engine deserializes (engines are tied to the GPU model and TensorRT version that built them);
2. ``ort-cuda`` — an onnxruntime session created with ``CUDAExecutionProvider`` that *kept* it: the decision is
   made from ``session.get_providers()`` of the created session. ``onnxruntime.get_available_providers()`` only
   says which providers the installed wheel was built with (onnxruntime-gpu lists CUDA on a host without a GPU,
   and then silently falls back to CPU), so it is never trusted alone;
3. on the CPU, the fastest engine ``medsim export`` timed for this model and precision (manifest ``cpu_timing``,
   only engines that passed their parity check): ``openvino`` (OpenVINO on the same ONNX file; bf16 on CPUs that
   have it; the NNCF INT8 model) or ``ort-cpu`` (onnxruntime); ``ort-cpu`` when the manifest has no timing (exports
   made before it).

``precision`` (``fp32`` / ``bf16`` / ``int8``) picks the model and engine mode: bf16 runs on OpenVINO only; int8 runs
the onnxruntime INT8 model (``--quantize static``) or OpenVINO's NNCF INT8 model (``--quantize openvino``).

Asking for a backend explicitly (``backend="tensorrt"`` / ``"ort-cuda"``) that cannot run raises
:class:`~medsim.deploy.BackendUnavailable` naming what is missing; ``"auto"`` logs why it skipped one and moves on.

Outputs (float32, one row per image, in input order)::

    embedding  (N, D)           L2-normalised (cosine similarity = dot product)
    attention  (N, 1, h, w)     in [0, 1], MONAI (x, y) axis order: see medsim.deploy.localizer
    logits     (N, n_classes)   only for models with a classifier head

No PyTorch, no MONAI: the runners are :mod:`medsim.runtime.runners` (TensorRT buffers through cuda-python's
runtime API), the ones the export's parity checks run.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medsim.runtime.errors import BackendUnavailable, DeployError
from medsim.runtime.manifest import manifest_embedding_dim
from medsim.runtime.preprocess import ImageSource, load_manifest, preprocess_with_size
from medsim.runtime.runners import (CPU_EP, CUDA_EP, ENGINE_NAME, OrtRunner, OvRunner, TrtRunner, import_ort,
                                    openvino_missing, ort_session, run_batched, trt_missing)

__all__ = ["BACKENDS", "PRECISIONS", "EmbeddingEngine", "embed_images", "open_engine", "timed_cpu_backend",
           "ENGINE_NAME", "CUDA_EP", "CPU_EP"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
#: the CPU backends ``auto`` chooses between from the export's timing
CPU_BACKENDS = ("ort-cpu", "openvino")


def timed_cpu_backend(manifest: dict[str, Any], precision: str) -> str | None:
    """The fastest CPU backend for ``precision`` in the export's timing (manifest ``cpu_timing``:
    ``{"images_per_s": {"ort-cpu/fp32": 188.0, "openvino/bf16": 388.0, ...}}``), counting only engines whose parity
    check passed (OpenVINO: manifest ``openvino.<precision>.passed``); ``None`` when nothing was timed for it."""
    rates = (manifest.get("cpu_timing") or {}).get("images_per_s") or {}
    passed = {p for p, sec in (manifest.get("openvino") or {}).items() if isinstance(sec, dict) and sec.get("passed")}
    timed = {}
    for key, rate in rates.items():
        name, _, prec = str(key).partition("/")
        if prec == precision and name in CPU_BACKENDS and rate and (name != "openvino" or prec in passed):
            timed[name] = float(rate)
    return max(timed, key=timed.get) if timed else None


# ----------------------------------------------------------------------------------------------------- engine
class EmbeddingEngine:
    """Inference on an exported medsim model (``medsim export RUN --out DIR``), without PyTorch.

    Args:
        model_dir: the export folder (``manifest.json``, ``model.onnx``[, ``model.plan``]).
        backend: ``auto`` (TensorRT → onnxruntime CUDA → the fastest CPU engine the export timed, the first that
            really runs), ``tensorrt``, ``ort-cuda``, ``ort-cpu`` or ``openvino``.
        batch_size: images per inference call (capped by a TensorRT engine's profile maximum).
        model: the ONNX file to run with onnxruntime, relative to ``model_dir`` (default: manifest ``model``,
            i.e. ``model.onnx``; ``model.int8.onnx`` for the INT8 export).
        threads: onnxruntime intra-op threads (default: ``MEDSIM_THREADS``, i.e. ``medsim ... --threads``; unset:
            onnxruntime's choice).
        device_id: CUDA device for ``tensorrt`` / ``ort-cuda``.
        precision: ``fp32``; ``bf16`` (OpenVINO's bf16 precision hint; ``auto`` or ``openvino``) or ``int8`` (the
            export's onnxruntime INT8 model, or its OpenVINO NNCF INT8 model; not ``tensorrt``).

    Attributes:
        backend: the backend in use: ``tensorrt``, ``ort-cuda``, ``ort-cpu``, ``openvino`` or ``triton``.
        providers: onnxruntime providers of the session (``[]`` for TensorRT).
        manifest: the parsed ``manifest.json``.
        input_shape: (C, x, y) one preprocessed image, MONAI axis order.
        output_names: model outputs, e.g. ``["embedding", "attention"]``.

    Raises:
        DeployError: missing/invalid manifest or model file; BackendUnavailable: an explicitly requested
            backend cannot run here (the message lists what is missing).
    """

    def __init__(self, model_dir: str | os.PathLike, *, backend: str = "auto", batch_size: int = 32,
                 model: str | None = None, threads: int | None = None, device_id: int = 0, precision: str = "fp32"):
        if backend not in BACKENDS and not str(backend).startswith("triton="):  # triton=URL: a Triton server
            import difflib

            close = difflib.get_close_matches(str(backend), BACKENDS, n=1, cutoff=0.4)
            raise DeployError(f"unknown backend '{backend}'; choose {', '.join(BACKENDS)}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DeployError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise DeployError(f"{self.model_dir}: not a directory — give the folder written by "
                              "`medsim export RUN --out DIR`")
        self.manifest = load_manifest(self.model_dir)
        self.batch_size = int(batch_size)
        self.threads, self.device_id = threads, int(device_id)
        self.precision = self._check_precision(str(precision), str(backend))
        int8_ort = self.manifest.get("int8") or {}
        int8_ov = (self.manifest.get("openvino") or {}).get("int8") or {}
        default = (self._listed(int8_ort.get("model", "model.int8.onnx"), "int8.model") if precision == "int8"
                   else self._listed(self.manifest.get("model", "model.onnx"), "model"))
        self.onnx_path = self.model_dir / model if model else default
        #: what OpenVINO reads: the same ONNX file (fp32, bf16), or the NNCF INT8 IR
        self.ov_path = (self._listed(int8_ov.get("model", ""), "openvino.int8.model") if precision == "int8"
                        and int8_ov else self.onnx_path)
        trt_section = self.manifest.get("tensorrt") or {}
        # only an engine the manifest lists: a model.plan left beside a newer model.onnx holds old weights
        self.plan_path = self._listed(trt_section.get("model", ENGINE_NAME), "tensorrt.model")
        self._plan_listed = bool(trt_section)
        inp = self.manifest["input"]
        self.input_name = str(inp.get("name", "image"))
        self.input_shape = tuple(int(d) for d in inp.get("shape", [])[1:] if not isinstance(d, str))
        #: dense models (SAM) take any spatial size the export checked (manifest ``dynamic_spatial``), not on TensorRT
        self.dynamic_spatial: dict | None = self.manifest.get("dynamic_spatial") or None
        self.providers: list[str] = []
        self._runner, self.backend = self._select(backend)
        self.output_names: list[str] = list(self._runner.output_names)
        if self._runner.max_batch is not None and self.batch_size > self._runner.max_batch:
            logger.info("batch_size %d exceeds the TensorRT profile maximum %d; using %d", self.batch_size,
                        self._runner.max_batch, self._runner.max_batch)
            self.batch_size = self._runner.max_batch
        logger.info("%s: %s backend%s", self.model_dir, self.backend,
                    f" (providers {self.providers})" if self.providers else "")

    # ------------------------------------------------------------------------------------------- selection
    def _listed(self, name: Any, field: str) -> Path:
        """A file the manifest names, inside the export folder: an export is data from someone else, so a name
        that leaves the folder (absolute, ``..``, a link out) is refused rather than read."""
        path = self.model_dir / str(name)
        if Path(str(name)).is_absolute() or not path.resolve().is_relative_to(self.model_dir.resolve()):
            raise DeployError(f"{self.model_dir / 'manifest.json'}: '{field}' names {str(name)!r}, outside the "
                              "export folder; an export lists only its own files — re-export the run "
                              "(medsim export RUN --out DIR)")
        return path

    def _check_precision(self, precision: str, backend: str) -> str:
        """``precision`` when ``backend`` can run it with what this export holds; else :class:`DeployError` with
        the fix."""
        if precision not in PRECISIONS:
            raise DeployError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
        if precision == "fp32" or backend.startswith("triton="):
            return precision
        if backend == "tensorrt":  # the TensorRT path runs the manifest's plan, not a CPU model
            raise DeployError(f"{self.model_dir}: --precision {precision} runs a CPU model (onnxruntime/OpenVINO); "
                              "for TensorRT INT8/fp16 build the plan with `medsim export RUN --out DIR --trt "
                              "--precision int8` and use --precision fp32 --backend tensorrt")
        if precision == "bf16":
            if backend not in ("auto", "openvino"):
                raise DeployError(f"--precision bf16 runs on OpenVINO only (its bf16 precision hint); the '{backend}' "
                                  "backend has no bf16 model: use --backend openvino (or auto)")
            return precision
        has_ort = bool(self.manifest.get("int8"))
        has_ov = bool((self.manifest.get("openvino") or {}).get("int8"))
        make = "`medsim export RUN --out DIR --quantize static` (onnxruntime) or `--quantize openvino` (NNCF)"
        if backend == "openvino" and not has_ov:
            raise DeployError(f"{self.model_dir}: the export has no OpenVINO INT8 model; make one with `medsim export "
                              "RUN --out DIR --quantize openvino`" + (" (or use --backend ort-cpu for the onnxruntime "
                                                                      "INT8 model it has)" if has_ort else ""))
        if backend.startswith("ort-") and not has_ort:
            raise DeployError(f"{self.model_dir}: the export has no onnxruntime INT8 model; make one with `medsim "
                              "export RUN --out DIR --quantize static`" + (" (or use --backend openvino for the "
                                                                           "OpenVINO INT8 model it has)" if has_ov
                                                                           else ""))
        if not (has_ort or has_ov):
            raise DeployError(f"{self.model_dir}: the export has no INT8 model; make one with {make}")
        return precision

    def _ov_runner(self) -> OvRunner:
        if not self.ov_path.is_file():
            raise DeployError(f"{self.ov_path}: model not found — export the run first (medsim export RUN --out DIR"
                              + (" --quantize openvino)" if self.precision == "int8" else ")"))
        return OvRunner(self.ov_path, "fp32" if self.precision == "int8" else self.precision, self.threads)

    def _cpu_auto(self) -> tuple[Any, str]:
        """``auto`` on the CPU: the engine ``medsim export`` timed fastest for this precision; onnxruntime when the
        manifest has no timing for it (or OpenVINO cannot run here)."""
        choice = timed_cpu_backend(self.manifest, self.precision)
        has_ort = self.precision != "int8" or bool(self.manifest.get("int8"))
        if choice == "openvino" or not has_ort or self.precision == "bf16":
            missing = openvino_missing("fp32" if self.precision == "int8" else self.precision)
            if not missing:
                try:
                    return self._ov_runner(), "openvino"
                except DeployError as e:
                    if not has_ort or self.precision == "bf16":
                        raise
                    logger.warning("OpenVINO not usable (%s); running onnxruntime", e)
            elif not has_ort or self.precision == "bf16":
                raise BackendUnavailable(f"OpenVINO {self.precision} unavailable: missing " + "; ".join(missing))
            else:
                logger.info("OpenVINO skipped (timed fastest at export): missing %s", "; ".join(missing))
        return self._cpu_runner(), "ort-cpu"

    def _select(self, backend: str) -> tuple[Any, str]:
        if backend.startswith("triton="):  # the server runs the model it holds (medsim.deploy.triton_client)
            from medsim.deploy.triton_client import triton_runner

            return triton_runner(backend, self.manifest, self.model_dir), "triton"
        if backend == "openvino":
            return self._ov_runner(), "openvino"
        if backend == "auto" and self.precision != "fp32":  # CPU models: TensorRT and CUDA sessions do not apply
            return self._cpu_auto()
        if backend == "auto" and not (self._plan_listed and self.plan_path.is_file()):
            logger.debug("TensorRT skipped: no engine file listed in the manifest (%s)", self.plan_path)
        elif backend in ("auto", "tensorrt"):
            missing = trt_missing(self.plan_path)
            if not self._plan_listed:
                missing.insert(0, "a TensorRT engine listed in manifest.json (a model.plan the manifest does not "
                                  "list belongs to an earlier export; rebuild with medsim export RUN --out DIR --trt)")
            if not missing:
                try:
                    return TrtRunner(self.plan_path, self.device_id), "tensorrt"
                except Exception as e:  # noqa: BLE001 - TensorRT/CUDA raise RuntimeError, TypeError…
                    if backend == "tensorrt":
                        raise BackendUnavailable(f"TensorRT backend unavailable: {e}") from e
                    logger.warning("TensorRT engine %s not usable (%s: %s); trying onnxruntime", self.plan_path,
                                   type(e).__name__, e)
            elif backend == "tensorrt":
                raise BackendUnavailable("TensorRT backend unavailable: missing " + "; ".join(missing))
            else:
                logger.info("TensorRT skipped: missing %s", "; ".join(missing))
        if not self.onnx_path.is_file():
            raise DeployError(f"{self.onnx_path}: ONNX model not found — export the run first "
                              "(medsim export RUN --out DIR)")
        if backend == "ort-cpu":
            return self._cpu_runner(), "ort-cpu"
        ort = import_ort()
        available = list(ort.get_available_providers())
        if CUDA_EP not in available:
            if backend == "ort-cuda":
                raise BackendUnavailable(f"ort-cuda backend unavailable: this onnxruntime build has no {CUDA_EP} "
                                         f"(available: {', '.join(available)}); install onnxruntime-gpu instead "
                                         "of onnxruntime")
            return self._cpu_auto()
        try:
            session = ort_session(self.onnx_path, [(CUDA_EP, {"device_id": self.device_id}), CPU_EP],
                                   self.threads)
        except DeployError as e:
            if backend == "ort-cuda":
                raise BackendUnavailable(f"ort-cuda backend unavailable: {e}") from e
            logger.info("onnxruntime could not create a CUDA session (%s); running on CPU", e)
            return self._cpu_auto()
        got = list(session.get_providers())
        if CUDA_EP in got:
            self.providers = got
            return OrtRunner(session), "ort-cuda"
        if backend == "ort-cuda":
            raise BackendUnavailable(f"ort-cuda backend unavailable: onnxruntime lists {CUDA_EP} but the session "
                                     f"created for {self.onnx_path.name} only has {got} — no usable GPU, driver, "
                                     "or CUDA/cuDNN libraries matching this onnxruntime-gpu")
        logger.info("onnxruntime lists %s but the session fell back to %s (no usable GPU); running on CPU",
                    CUDA_EP, got)
        self.providers = got
        return OrtRunner(session), "ort-cpu"

    def _cpu_runner(self) -> OrtRunner:
        if not self.onnx_path.is_file():
            raise DeployError(f"{self.onnx_path}: ONNX model not found — export the run first "
                              "(medsim export RUN --out DIR)")
        session = ort_session(self.onnx_path, [CPU_EP], self.threads)
        self.providers = list(session.get_providers())
        return OrtRunner(session)

    # ----------------------------------------------------------------------------------------------- running
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed images (N, C, x, y) float32 → ``{output: (N, ...)}``, in chunks of ``batch_size``.

        Raises:
            DeployError: the array does not have the model's input shape.
        """
        if self._runner is None:
            raise DeployError(f"{self.model_dir}: the engine was closed")
        x = np.asarray(images, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or (self.input_shape and tuple(x.shape[1:]) != self.input_shape
                                                   and not self._other_size_ok(x.shape[1:])):
            raise DeployError(f"{self.model_dir}: expected preprocessed images of shape (N, "
                              f"{', '.join(map(str, self.input_shape))}), got {x.shape}")
        if len(x) == 0:
            return self._empty()
        return run_batched(self._runner, x, self.batch_size)

    def _other_size_ok(self, shape: tuple[int, ...]) -> bool:
        """A (C, *S) input of another spatial size is valid for a dense export (``dynamic_spatial``: same channels,
        each axis >= ``min_size`` and a multiple of ``multiple``); TensorRT engines keep their built size."""
        spec = self.dynamic_spatial
        if not spec or shape[:1] != self.input_shape[:1]:
            return False
        if self.backend == "tensorrt":
            raise DeployError(f"{self.model_dir}: the TensorRT engine is built for inputs of "
                              f"{list(self.input_shape)}; for other sizes (a whole volume) use the onnxruntime "
                              "backend (--backend ort-cpu or ort-cuda)")
        m = int(spec.get("multiple", 1))
        return all(n >= int(lo) and n % m == 0 for n, lo in zip(shape[1:], spec.get("min_size", [])))

    def preprocess(self, image: ImageSource) -> np.ndarray:
        """One image → (C, x, y) float32 as the model expects (see :func:`medsim.deploy.preprocess`)."""
        return preprocess_with_size(image, self.manifest)[0]

    def embed(self, images: Iterable[ImageSource] | ImageSource, *, return_sizes: bool = False
              ) -> dict[str, np.ndarray]:
        """Images (paths, (H, W[, C]) arrays or PIL images) → model outputs, preprocessed and run in batches.

        Args:
            images: a list of images (a single path/array is accepted as a list of one).
            return_sizes: add ``image_size`` (N, 2) int: each original image's (H, W) (ct3d: (N, 3), the volume's
                original (x, y, z) shape), for
                :meth:`medsim.deploy.Localizer.localize`.

        Returns:
            ``{"embedding": (N, D), "attention": (N, 1, h, w)[, "logits": (N, K)][, "image_size": (N, 2)]}``.

        Raises:
            DeployError: an image cannot be read (the message names it).
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
            images = [images]
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        sizes: list[tuple[int, int]] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            out = self.run(np.stack(batch))
            for n in self.output_names:
                chunks[n].append(out[n])
            batch.clear()

        for img in images:
            x, hw = preprocess_with_size(img, self.manifest)
            batch.append(x)
            sizes.append(hw)
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        result = {n: np.concatenate(v) for n, v in chunks.items()} if sizes else self._empty()
        if return_sizes:
            result["image_size"] = np.asarray(sizes, dtype=np.int64).reshape(len(sizes), -1)
        return result

    def _empty(self) -> dict[str, np.ndarray]:
        shapes = {o["name"]: o.get("shape", []) for o in self.manifest.get("outputs", [])}
        out = {}
        for n in self.output_names:
            dims = [int(d) for d in shapes.get(n, [])[1:] if not isinstance(d, str)]
            out[n] = np.zeros((0, *dims), dtype=np.float32)
        return out

    # ------------------------------------------------------------------------------------------------ misc
    @property
    def embedding_dim(self) -> int:
        """D, from the manifest (``embedding_dim``; exports before issue 10 wrote ``embedding_size``)."""
        return manifest_embedding_dim(self.manifest)

    embedding_size = embedding_dim  # the name older code used

    @property
    def recheck_margin(self) -> float | None:
        """The export's fp32-recheck margin for the model this engine runs (:mod:`medsim.runtime.ties`: manifest
        ``openvino.bf16.recheck`` / ``openvino.int8.recheck`` / ``int8.recheck``, calibrated at export time);
        ``None`` at fp32, on TensorRT/Triton, or for an export made before the recheck existed.

        Raises:
            DeployError: the manifest's margin is not a finite number >= 0.
        """
        if self.precision == "fp32" or self.backend not in ("openvino", "ort-cpu", "ort-cuda"):
            return None
        if self.backend == "openvino":
            section, field = (self.manifest.get("openvino") or {}).get(self.precision), f"openvino.{self.precision}"
        else:
            section, field = self.manifest.get("int8"), "int8"
        record = (section or {}).get("recheck") if isinstance(section, dict) else None
        if not record:
            return None
        margin = record.get("margin") if isinstance(record, dict) else record
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise DeployError(f"{self.model_dir / 'manifest.json'}: '{field}.recheck.margin' must be a number >= 0, "
                              f"got {margin!r}; re-export the run (medsim export RUN --out DIR)")
        return float(margin)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    def close(self) -> None:
        """Release the session / engine and its GPU buffers."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> "EmbeddingEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EmbeddingEngine({str(self.model_dir)!r}, backend={self.backend!r}, "
                f"input=(batch, {', '.join(map(str, self.input_shape))}), outputs={self.output_names})")


def open_engine(model_dir: str | os.PathLike, backend: str = "auto", precision: str = "fp32", **kwargs: Any
                ) -> EmbeddingEngine:
    """An :class:`EmbeddingEngine` for the export's model at ``precision``: ``fp32``; ``bf16`` (OpenVINO);
    ``int8`` — a CPU model, onnxruntime static QDQ / dynamic (``--quantize static|dynamic``) or OpenVINO NNCF
    (``--quantize openvino``); ``backend="auto"`` then picks the one the export timed fastest. GPU hosts get their
    INT8 speed from a TensorRT engine instead (``medsim export --trt --precision int8``)."""
    return EmbeddingEngine(model_dir, backend=backend, precision=precision, **kwargs)


def embed_images(model_dir: str | os.PathLike, images: Sequence[ImageSource], **kwargs: Any
                 ) -> dict[str, np.ndarray]:
    """One-shot :meth:`EmbeddingEngine.embed` (opens and closes the engine)."""
    with EmbeddingEngine(model_dir, **kwargs) as engine:
        return engine.embed(list(images))
