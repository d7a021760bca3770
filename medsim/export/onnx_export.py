"""Export a trained run to ONE self-contained ONNX file, check it, and prove it computes what PyTorch computes.

The exported graph has one input and a fixed tuple of outputs::

    image      float32 (batch, C, x, y)   preprocessed as manifest.json["preprocessing"] says
    embedding  float32 (batch, D)         L2-normalised
    attention  float32 (batch, 1, h, w)   in [0, 1], at the backbone's feature resolution (1/16 for layer3)
    logits     float32 (batch, n_classes) only for models with a classifier head
    global     float32 (batch, Dg, *Sg)   only for dense models (SAM): per-voxel global / local embeddings,
    local      float32 (batch, Dl, *Sl)   L2-normalised over channels; where their cells sit on the input:
                                          manifest.json["dense_geometry"][name] (strides, centres)

The batch axis is dynamic (named ``batch``); the spatial size is fixed to the run's ``image_size``, except for
dense models (SAM), whose spatial axes are dynamic too (``x``/``y``/``z`` on the input, ``<output>_x`` … on the maps):
a landmark search embeds the whole volume, not the training crop. The export checks that at a second, larger size
(onnxruntime vs PyTorch, and each map's cell centres and strides unchanged, so the manifest's ``dense_geometry``
holds for every size: only the cell counts change) and records it as ``manifest.json["dynamic_spatial"]``.

Exporters (``torch.onnx.export``, torch 2.13): ``"dynamo"`` (``torch.export`` + onnxscript) emits opset >= 18
only — asked for 17 it fails to down-convert MONAI ResNet's ``ReduceMean`` and silently keeps 18 — so
``exporter="auto"`` uses it for ``opset >= 18`` (with ``external_data=False``: one file) and the TorchScript
exporter (``dynamo=False``, deprecated but exact) for ``opset <= 17``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medsim.export.errors import ExportError, ExportParityError
from medsim.export.manifest import utc_now, write_manifest
from medsim.preprocessing import describe
from medsim.export.run import LoadedRun, load_run, preprocess_items, sha256_file, split_images

__all__ = ["OUTPUT_ORDER", "DENSE_OUTPUTS", "INPUT_NAME", "MODEL_NAME", "ExportWrapper", "export_onnx", "export_module",
           "check_parity", "check_dynamic_spatial", "ort_session", "run_onnx", "onnx_output_shapes"]

logger = logging.getLogger(__name__)

#: graph output order (``logits`` only when the model has a classifier; the dense maps ``global``/``local`` only
#: for models that return them: SAM, :class:`medsim.nn.SAMNet`)
OUTPUT_ORDER = ("embedding", "attention", "logits", "global", "local")
#: outputs that are per-voxel maps with their own geometry (``network.map_geometry(name, input_size)``)
DENSE_OUTPUTS = ("global", "local")
INPUT_NAME = "image"
MODEL_NAME = "model.onnx"
#: largest model protobuf can hold in one file
_PROTO_LIMIT = 2 * 1024**3 - 1


class ExportWrapper(nn.Module):
    """Embedder → tuple: ``forward(image (B, C, *S))`` returns the outputs ``names`` in that order.

    ONNX graphs have positional outputs; the dict of :class:`medsim.nn.Embedder` becomes a tuple whose order is
    fixed by ``names`` (a subset of :data:`OUTPUT_ORDER`).
    """

    def __init__(self, network: nn.Module, names: Sequence[str]):
        super().__init__()
        self.network = network
        self.names = tuple(names)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network(image)
        return tuple(out[n] for n in self.names)


def _output_names(network: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    with torch.no_grad():
        out = network(example)
    if not isinstance(out, dict) or "embedding" not in out or "attention" not in out:
        raise ExportError(f"{type(network).__name__} does not follow the Embedder contract (forward must return "
                          f"a dict with 'embedding' and 'attention'; got {type(out).__name__})")
    names = [n for n in OUTPUT_ORDER if n in out]
    return names, {n: tuple(out[n].shape) for n in names}


def _pick_exporter(exporter: str, opset: int) -> str:
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ExportError(f"unknown exporter '{exporter}'; choose auto, dynamo or legacy")
    if exporter == "auto":
        return "dynamo" if opset >= 18 else "legacy"
    return exporter


def export_module(network: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, opset: int = 17,
                  exporter: str = "auto", dynamic_spatial: bool = False) -> dict[str, Any]:
    """Export ``network`` (an Embedder) to ``path`` as one self-contained ONNX file (written in place: callers
    wanting atomicity pass a temporary path).

    Args:
        network: module returning the Embedder dict; put in eval mode here.
        example: (B, C, *S) example batch, B >= 2 (a batch of 1 would be specialised by ``torch.export``).
        opset: ONNX opset of the default domain.
        exporter: ``auto`` / ``dynamo`` / ``legacy`` (see the module docstring).
        dynamic_spatial: make the spatial axes of the input and of every output with spatial axes dynamic too
            (dense models: the size is then the caller's to check, see :func:`check_dynamic_spatial`).

    Returns:
        ``{"output_names", "output_shapes" (from PyTorch, batch of ``example``), "opset" (actual), "exporter"}``.

    Raises:
        ExportError: the exporter failed, produced external data, or a >2 GB model.
    """
    import onnx

    if example.shape[0] < 2:
        example = example.repeat(2, *([1] * (example.ndim - 1)))
    network = network.eval()
    names, shapes = _output_names(network, example)
    wrapper = ExportWrapper(network, names).eval()
    kind = _pick_exporter(exporter, opset)
    path = Path(path)
    kw: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": names, "opset_version": opset,
                          "verbose": False}
    axes = {n: _dynamic_axes(n, len(shapes[n]) if n in shapes else example.ndim, dynamic_spatial)
            for n in [INPUT_NAME, *names]}
    if kind == "dynamo":
        dims = {0: torch.export.Dim("batch", min=1)}
        if dynamic_spatial:
            dims.update({a: torch.export.Dim(axes[INPUT_NAME][a], min=2) for a in range(2, example.ndim)})
        kw.update(dynamo=True, external_data=False, optimize=True, dynamic_shapes=(dims,))
    else:
        kw.update(dynamo=False, do_constant_folding=True, dynamic_axes=axes)
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(wrapper, (example,), str(path), **kw)
    except Exception as e:  # noqa: BLE001 - exporter internals raise anything
        raise ExportError(f"torch.onnx.export ({kind} exporter, opset {opset}) failed for {path.name}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} — try "
                          f"exporter='{'legacy' if kind == 'dynamo' else 'dynamo'}' with "
                          f"opset {'17' if kind == 'dynamo' else '18'}") from e
    extra = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    if extra:
        raise ExportError(f"{path}: the exporter wrote external data ({', '.join(extra)}); the model must be one "
                          "file")
    model = onnx.load(str(path))
    _fix_output_shapes(model, names, shapes, axes)
    if model.ByteSize() > _PROTO_LIMIT:
        raise ExportError(f"{path}: model larger than 2 GB cannot be one self-contained ONNX file")
    onnx.save_model(model, str(path))
    actual = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if actual != opset:
        logger.warning("%s exporter produced opset %d instead of the requested %d", kind, actual, opset)
    return {"output_names": names, "output_shapes": shapes, "opset": int(actual), "exporter": kind}


def _dynamic_axes(name: str, ndim: int, spatial: bool) -> dict[int, str]:
    """The named dynamic axes of a graph input/output of ``ndim`` dimensions: ``batch``, and with ``spatial`` the
    axes after the channel one (``x``/``y``/``z`` on the input, ``<name>_x`` … on an output)."""
    axes = {0: "batch"}
    if spatial and ndim > 2:
        prefix = "" if name == INPUT_NAME else f"{name}_"
        axes.update({a: prefix + "xyzw"[a - 2] for a in range(2, ndim)})
    return axes


def _fix_output_shapes(model: Any, names: Sequence[str], shapes: dict[str, tuple[int, ...]],
                       axes: dict[str, dict[int, str]] | None = None) -> None:
    """Declare every output as ("batch", *static dims measured in PyTorch), the dynamic ones (``axes``) by name
    (the TorchScript exporter leaves symbolic names such as 'Divembedding_dim_1' where shapes went through
    F.normalize)."""
    for out in model.graph.output:
        if out.name not in shapes:
            continue
        dims = out.type.tensor_type.shape.dim
        named = (axes or {}).get(out.name, {0: "batch"})
        want = [named.get(i, v) for i, v in enumerate(["batch", *shapes[out.name][1:]])]
        while len(dims) < len(want):
            dims.add()
        for d, w in zip(dims, want):
            if isinstance(w, str):
                d.dim_param = w
            else:
                d.dim_value = int(w)


def onnx_output_shapes(onnx_path: str | os.PathLike) -> dict[str, list[int | str]]:
    """``{name: [dims]}`` of the graph inputs and outputs (``"batch"`` for the dynamic axis)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.input, *m.graph.output]}


def ort_session(onnx_path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` — :func:`medsim.runtime.runners.ort_session`, the one the deployed
    :class:`~medsim.deploy.EmbeddingEngine` opens — with its errors as :class:`ExportError`."""
    from medsim.runtime.errors import DeployError
    from medsim.runtime.runners import CPU_EP
    from medsim.runtime.runners import ort_session as runtime_session

    try:
        return runtime_session(onnx_path, [CPU_EP], threads)  # threads: default MEDSIM_THREADS (medsim --threads)
    except DeployError as e:
        raise ExportError(str(e)) from e


def run_onnx(session: Any, images: np.ndarray, *, batch: int = 32, names: Sequence[str] | None = None
             ) -> dict[str, np.ndarray]:
    """Run ``images`` (N, C, *S) float32 through an ORT session in chunks of ``batch``: ``{output: (N, ...)}``
    (``names``: the outputs to compute, default all) — the deployed engine's runner and batching
    (:class:`medsim.runtime.runners.OrtRunner`, :func:`medsim.runtime.runners.run_batched`)."""
    from medsim.runtime.runners import OrtRunner, run_batched

    return run_batched(OrtRunner(session, names), images, batch)


def check_parity(onnx_path: str | os.PathLike, network: nn.Module, images: np.ndarray | torch.Tensor, *,
                 batch_sizes: Sequence[int] = (1, 2), atol: float = 1e-4, threads: int | None = None,
                 runner: Any = None, engine: str = "onnxruntime") -> dict[str, Any]:
    """Compare onnxruntime (CPU, fp32) — or another runner of the same file — with PyTorch on the same
    preprocessed images.

    Every image goes through both at each batch size (the last chunk may be smaller), so batch 1, the given
    batch and a ragged tail exercise the dynamic batch axis.

    Args:
        onnx_path: the exported model.
        network: the PyTorch Embedder it was exported from.
        images: (N, C, *S) float32, preprocessed.
        batch_sizes: batch sizes to run.
        atol: largest allowed absolute difference, per output.
        runner: a :mod:`medsim.runtime.runners` runner of ``onnx_path`` to check instead of onnxruntime's (e.g.
            :class:`~medsim.runtime.runners.OvRunner`); ``engine`` names it in messages.

    Returns:
        ``{"atol", "batch_sizes", "images", "max_abs_diff": {output: float}, "by_batch": {"1": {...}, ...}}``.

    Raises:
        ExportParityError: an output differs by more than ``atol`` (or is NaN in one runtime only); the message
            names the output, the difference and the batch size.
    """
    x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 3 or len(x) == 0:
        raise ExportError(f"parity images must be a non-empty (N, C, *spatial) array, got shape {x.shape}")
    from medsim.runtime.runners import OrtRunner, run_batched

    runner = runner if runner is not None else OrtRunner(ort_session(onnx_path, threads=threads))
    names = list(runner.output_names)
    network = network.eval()
    with torch.no_grad():
        ref_all = network(torch.from_numpy(x))
    missing = [n for n in names if n not in ref_all]
    if missing:
        raise ExportError(f"{onnx_path}: outputs {missing} are not produced by the PyTorch network")
    ref = {n: ref_all[n].numpy() for n in names}
    by_batch: dict[str, dict[str, float]] = {}
    worst: dict[str, float] = {n: 0.0 for n in names}
    for b in batch_sizes:
        got = run_batched(runner, x, int(b))
        diffs = {}
        for n in names:
            if got[n].shape != ref[n].shape:
                raise ExportParityError(f"{onnx_path}: output '{n}' has shape {got[n].shape} in {engine} but "
                                        f"{ref[n].shape} in PyTorch at batch size {b}",
                                        output=n, diff=float("inf"), atol=atol, batch=int(b))
            d = np.abs(got[n].astype(np.float64) - ref[n].astype(np.float64))
            both_nan = np.isnan(got[n]) & np.isnan(ref[n])
            diffs[n] = float(np.max(np.where(both_nan, 0.0, d))) if d.size else 0.0
            worst[n] = max(worst[n], diffs[n]) if not np.isnan(diffs[n]) else float("nan")
            if not diffs[n] <= atol:  # NaN fails too
                raise ExportParityError(
                    f"{onnx_path}: output '{n}' differs from PyTorch by {diffs[n]:.3g} in {engine} (atol {atol:g}) at "
                    f"batch size {b} over {len(x)} image(s) — the ONNX model does not reproduce the checkpoint; re-export "
                    "(another opset or exporter='legacy'/'dynamo') and do not deploy this file",
                    output=n, diff=diffs[n], atol=atol, batch=int(b))
        by_batch[str(int(b))] = diffs
    return {"atol": atol, "batch_sizes": [int(b) for b in batch_sizes], "images": int(len(x)),
            "max_abs_diff": worst, "by_batch": by_batch}


def check_dynamic_spatial(onnx_path: str | os.PathLike, network: nn.Module, image: np.ndarray,
                          names: Sequence[str], *, atol: float = 1e-4, threads: int | None = None
                          ) -> dict[str, Any]:
    """Prove that a dense model exported with dynamic spatial axes holds at another size: ``image`` (1, C, *S)
    grown by 1, 2, 3 … × ``multiple`` voxels along successive axes (reflected; ``multiple`` = the coarsest map's
    stride), run through onnxruntime and PyTorch (every output within ``atol``), and every dense map's cell centres
    and strides there equal to those at ``S`` with the cell count of the ONNX output (so ``dense_geometry`` with the
    output's own cell counts places the cells of any size).

    Returns:
        the manifest's ``dynamic_spatial``: ``{"axes", "multiple", "min_size", "checked_size", "max_abs_diff"}``.

    Raises:
        ExportParityError: an output differs beyond ``atol`` at the grown size; ExportError: the geometry moves
            with the size (then only the training size can be used).
    """
    x = np.ascontiguousarray(np.asarray(image, dtype=np.float32)[:1])
    size = [int(v) for v in x.shape[2:]]
    dense = [n for n in names if n in DENSE_OUTPUTS]
    geoms = {n: network.map_geometry(n, size) for n in dense}
    multiple = int(max(max(a.stride for a in g.axes) for g in geoms.values()))
    grown = [n + multiple * (k + 1) for k, n in enumerate(size)]
    xg = np.pad(x, [(0, 0), (0, 0)] + [(0, g - n) for g, n in zip(grown, size)], mode="reflect")
    sess = ort_session(onnx_path, threads=threads)
    got = run_onnx(sess, xg, batch=1, names=list(names))
    with torch.no_grad():
        ref = network.eval()(torch.from_numpy(xg))
    diffs = {}
    for n in names:
        r = ref[n].numpy()
        if got[n].shape != r.shape:
            raise ExportParityError(f"{onnx_path}: output '{n}' is {got[n].shape} in onnxruntime but {r.shape} in "
                                    f"PyTorch on a {grown} input", output=n, diff=float("inf"), atol=atol, batch=1)
        diffs[n] = float(np.abs(got[n].astype(np.float64) - r).max()) if r.size else 0.0
        if not diffs[n] <= atol:
            raise ExportParityError(f"{onnx_path}: output '{n}' differs from PyTorch by {diffs[n]:.3g} (atol "
                                    f"{atol:g}) on a {grown} input (dynamic spatial axes); do not deploy this file",
                                    output=n, diff=diffs[n], atol=atol, batch=1)
    for n, g in geoms.items():
        h = network.map_geometry(n, grown)
        same = all(abs(a.centre - b.centre) < 1e-6 and a.stride == b.stride for a, b in zip(g.axes, h.axes))
        if not same or list(h.grid) != list(got[n].shape[2:]):
            raise ExportError(f"{type(network).__name__}: the cells of '{n}' move with the input size ({g.to_dict()} "
                              f"at {size}, {h.to_dict()} at {grown}, ONNX grid {list(got[n].shape[2:])}); the "
                              "export cannot serve other sizes")
    return {"axes": ["x", "y", "z"][: len(size)], "multiple": multiple, "min_size": size, "checked_size": grown,
            "max_abs_diff": diffs,
            "convention": "inputs of any spatial size >= min_size that is a multiple of `multiple` (zero-padded at "
                          "the far end: the grid's affine is unchanged); each dense map keeps the centres and "
                          "strides of dense_geometry, its cell count is its output's shape"}


def _parity_inputs(run: LoadedRun, parity_images: Any, n_max: int) -> tuple[np.ndarray, str]:
    if parity_images is None:
        x, _, split = split_images(run, "validation", limit=n_max)
        return x, f"{split} split"
    if isinstance(parity_images, (np.ndarray, torch.Tensor)):
        x = parity_images.detach().cpu().numpy() if torch.is_tensor(parity_images) else parity_images
        return np.ascontiguousarray(x, dtype=np.float32), "given arrays"
    items = list(parity_images)
    if not items:
        raise ExportError("parity_images is empty; pass image paths, a (N, C, *S) array, or None for the run's "
                          "validation split")
    return preprocess_items(items, run.transform), "given images"


def _network_summary(run: LoadedRun) -> dict[str, Any]:
    out: dict[str, Any] = {"class": type(run.network).__name__}
    spec = run.record.get("network", {})
    for key in ("backbone", "spatial_dims", "in_channels", "cut", "embedding_dim", "attention", "widen_factor"):
        v = spec.get(key)
        if key in spec and (isinstance(v, (int, float, str, bool)) or v is None):
            out[key] = v
    return out


def export_onnx(run_or_checkpoint: str | os.PathLike | LoadedRun, out_dir: str | os.PathLike, *, opset: int = 17,
                batch: int = 2, parity_images: Any = None, atol: float = 1e-4, exporter: str = "auto",
                parity_max_images: int = 32) -> dict[str, Any]:
    """Export a run's network to ``out_dir/model.onnx`` and write ``out_dir/manifest.json``.

    The model is written to a temporary file, checked with ``onnx.checker.check_model(full_check=True)``,
    compared with PyTorch in onnxruntime, and only then moved into place (``os.replace``): a model that fails
    any check never appears as ``model.onnx``.

    Args:
        run_or_checkpoint: a run directory (``best.pt``, else ``last.pt``), a checkpoint inside one, or a
            :class:`~medsim.export.run.LoadedRun`.
        out_dir: output folder (created).
        opset: ONNX opset (17: TorchScript exporter; >= 18: dynamo exporter; see the module docstring).
        batch: example batch for export and the second parity batch size (parity runs batch 1 and ``batch``).
        parity_images: ``None`` (the run's validation split through ``eval#preprocessing``; test/training when
            empty), image paths / datalist items (preprocessed the same way), or a preprocessed (N, C, *S) array.
        atol: largest allowed absolute difference per output (fp32).
        exporter: ``auto`` / ``dynamo`` / ``legacy``.
        parity_max_images: at most this many split images are compared.

    Returns:
        ``{"onnx_path", "manifest_path", "manifest"}``.

    Raises:
        ExportError: the run cannot be opened or exported; ExportParityError: ONNX ≠ PyTorch beyond ``atol``.
    """
    import onnx

    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    run = run_or_checkpoint if isinstance(run_or_checkpoint, LoadedRun) else load_run(run_or_checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, images_from = _parity_inputs(run, parity_images, max(parity_max_images, batch))
    example = torch.from_numpy(images[: max(batch, 2)])
    if len(example) < 2:
        example = example.repeat(2, *([1] * (example.ndim - 1)))

    geometry = _attention_geometry(run.network, images.shape[2:])
    dense = hasattr(run.network, "map_geometry")  # dense maps (SAM): any spatial size, see the module docstring
    final = out / MODEL_NAME
    tmp = out / f".{final.stem}.tmp{os.getpid()}.onnx"
    try:
        info = export_module(run.network, example, tmp, opset=opset, exporter=exporter, dynamic_spatial=dense)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:  # noqa: BLE001 - onnx raises ValidationError / InferenceError
            raise ExportError(f"{final}: onnx.checker rejected the exported model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
        parity = check_parity(tmp, run.network, images, batch_sizes=sorted({1, int(batch)}), atol=atol)
        spatial = (check_dynamic_spatial(tmp, run.network, images[:1], info["output_names"], atol=atol)
                   if dense else None)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    parity["images_from"] = images_from

    shapes = info["output_shapes"]
    if geometry is not None:
        geometry.check_grid(shapes["attention"][2:])
    in_shape = list(images.shape[1:])
    import onnxruntime

    manifest: dict[str, Any] = {
        "schema": 1,
        "format": "onnx",
        "model": MODEL_NAME,
        "created": utc_now(),
        "medsim_version": _medsim_version(),
        "versions": {"medsim": _medsim_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "monai": _monai_version()},
        "exporter": info["exporter"],
        "opset": info["opset"],
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", *in_shape],
                  "layout": "(batch, C, x, y): MONAI channel-first, spatially transposed vs PIL (H, W)"},
        "outputs": [_describe_output(n, shapes[n]) for n in info["output_names"]],
        "output_names": info["output_names"],
        "embedding_dim": int(shapes["embedding"][1]),
        "attention_resolution": [int(v) for v in shapes["attention"][2:]],
        **({"attention_geometry": geometry.to_dict()} if geometry is not None else {}),
        **_dense_geometry(run.network, images.shape[2:], info["output_names"], shapes),
        **({"dynamic_spatial": spatial} if spatial else {}),
        "classes": list(run.classes),
        "n_classes": len(run.classes),
        "preprocessing": describe(run.record["eval_preprocessing"]),
        "network": _network_summary(run),
        "source": {"checkpoint": run.checkpoint.name, "sha256": sha256_file(run.checkpoint)},
        "parity": parity,
    }
    manifest_path = write_manifest(out, manifest)
    return {"onnx_path": str(final), "manifest_path": str(manifest_path), "manifest": manifest}


def _attention_geometry(network: nn.Module, input_size: Sequence[int]) -> Any:
    """The network's :class:`~medsim.runtime.geometry.AttentionGeometry` for ``input_size`` (where each attention
    cell sits on the input; the localizer places it there), or ``None`` with a warning for a network without an
    ``attention_geometry`` method (its maps are then stretched over the image)."""
    derive = getattr(network, "attention_geometry", None)
    if derive is None:
        logger.warning("%s has no attention_geometry(input_size): the manifest records no attention geometry and "
                       "localize will stretch its attention grid over the whole image", type(network).__name__)
        return None
    try:
        return derive([int(v) for v in input_size])
    except (NotImplementedError, ValueError) as e:
        raise ExportError(f"cannot derive where the attention cells of {type(network).__name__} sit on a "
                          f"{list(input_size)} input: {e}") from e


def _dense_geometry(network: nn.Module, input_size: Sequence[int], names: Sequence[str],
                    shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``{"dense_geometry": {name: geometry dict}}`` for the dense outputs among ``names`` (empty when none): where
    each map's cells sit on the input (``network.map_geometry``), checked against the exported grid."""
    dense = [n for n in names if n in DENSE_OUTPUTS]
    if not dense:
        return {}
    derive = getattr(network, "map_geometry", None)
    if derive is None:
        raise ExportError(f"{type(network).__name__} returns the dense outputs {dense} but has no "
                          "map_geometry(name, input_size): their cells could not be placed on the input")
    out = {}
    for n in dense:
        geom = derive(n, [int(v) for v in input_size])
        geom.check_grid(shapes[n][2:])
        out[n] = geom.to_dict()
    return {"dense_geometry": out}


def _describe_output(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    notes = {"embedding": "L2-normalised embedding (cosine similarity = dot product)",
             "attention": "spatial attention in [0, 1] at feature resolution, (1, x, y) axis order like the input",
             "logits": "class scores (unnormalised), classes in manifest order",
             "global": "per-voxel global embedding (coarse), L2-normalised over channels; cells: dense_geometry",
             "local": "per-voxel local embedding (fine), L2-normalised over channels; cells: dense_geometry"}
    return {"name": name, "dtype": "float32", "shape": ["batch", *[int(v) for v in shape[1:]]],
            "description": notes.get(name, "")}


def _medsim_version() -> str:
    import medsim

    return medsim.__version__


def _monai_version() -> str:
    import monai

    return monai.__version__
