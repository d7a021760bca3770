"""Where the cells of an attention map sit on the model input, and resampling a map onto an image with it.

A patch-grid map is not a picture of the whole input: its cell ``i`` along an axis is centred on the input pixel
``centre + i * stride`` of the layers that made it (convolution strides, paddings and kernels), which in general
is *not* the stretched position ``(i + 0.5) * input_size / cells``. Loss-based attention's 6×6 map (64-px input,
stride-2 trunk, unpadded 9×9 stride-4 patch conv) has its centres at 8.5 … 48.5 px (13–76 % of the image), a
layer3 ResNet map (four stride-2 "same" convs) at 16·i + 0.5 px. Placing such a map by stretching it moves every
heatmap right of and below what the model looked at.

:class:`AttentionGeometry` holds, for each spatial axis in MONAI order (x, y[, z], as the ``attention`` output):
``cells``, ``centre`` (cell 0's centre in continuous input-pixel coordinates — input pixel ``k`` covers
``[k, k + 1)``, so its centre is ``k + 0.5``), ``stride`` (input pixels between neighbouring cells) and
``receptive_field`` (input pixels one cell's convolutional path sees; informational), plus ``input_size``. The
model derives it from its layers (``model.attention_geometry(input_size)``, :mod:`medsim.nn.geometry`); the
export writes it into ``manifest.json`` (``attention_geometry``); the localizer reads it back.

Resampling (:func:`resample_attention`, the one rule for the 2D and 3D localizers and for
``medsim.nn.upsample_attention``): an output pixel ``p`` of an axis with ``n_out`` pixels sits at the input
position ``u = (p + 0.5) * input_size / n_out`` (the model input is the whole image, resized); it is linearly
interpolated between the two cells whose centres enclose ``u``. **Outside the first and last centres the edge
cell's value is held** (clamped, not extrapolated): the map says nothing about the border band its centres do not
reach, and clamping keeps the heat in the map's own [min, max]. The old "stretch" placement is the special case
``centre = input_size / (2 * cells)``, ``stride = input_size / cells`` (:meth:`AttentionGeometry.stretch`), and
gives exactly ``torch.nn.functional.interpolate(..., align_corners=False)``.

NumPy only (:mod:`medsim.runtime`): the model layer (:mod:`medsim.nn`) and the deployment layer share it, torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from medsim.runtime.errors import DeployError

__all__ = ["AxisGeometry", "AttentionGeometry", "interp_matrix", "resample_attention", "geometry_from_manifest"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial axis of an attention map: ``cells`` centred at ``centre + i * stride`` input pixels
    (continuous coordinates: input pixel k spans [k, k + 1)), each seeing ``receptive_field`` input pixels."""

    cells: int
    centre: float
    stride: float
    receptive_field: float

    def centres(self) -> np.ndarray:
        """(cells,) centre of every cell in input pixels (continuous coordinates)."""
        return self.centre + self.stride * np.arange(self.cells, dtype=np.float64)


@dataclass(frozen=True)
class AttentionGeometry:
    """Placement of an attention map's cells on the model input (see the module docstring).

    Attributes:
        input_size: the model input's spatial size, MONAI order (x, y[, z]).
        axes: one :class:`AxisGeometry` per spatial axis, same order.
    """

    input_size: tuple[int, ...]
    axes: tuple[AxisGeometry, ...]

    def __post_init__(self) -> None:
        if len(self.input_size) != len(self.axes) or not self.axes:
            raise DeployError(f"attention geometry needs one axis per input dimension, got input_size="
                              f"{list(self.input_size)} and {len(self.axes)} axes")
        for n, ax in zip(self.input_size, self.axes):
            if int(n) < 1 or ax.cells < 1 or not ax.stride > 0 or not np.isfinite([ax.centre, ax.stride]).all():
                raise DeployError(f"attention geometry axis is invalid: input_size={n}, cells={ax.cells}, "
                                  f"centre={ax.centre}, stride={ax.stride} (cells >= 1 and stride > 0 needed)")

    @property
    def grid(self) -> tuple[int, ...]:
        """Cells per axis (the attention map's spatial shape)."""
        return tuple(ax.cells for ax in self.axes)

    @classmethod
    def stretch(cls, grid: Sequence[int], input_size: Sequence[int] | None = None) -> "AttentionGeometry":
        """The placement of a plain resize: cell i of n at ``(i + 0.5) * input_size / n`` (what exports without
        a geometry get, and the right one for maps that are already at input resolution, e.g. Grad-CAM)."""
        size = tuple(int(v) for v in (input_size if input_size is not None else grid))
        return cls(size, tuple(AxisGeometry(int(g), n / (2.0 * g), n / float(g), n / float(g))
                               for g, n in zip(grid, size)))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the manifest's ``attention_geometry``)."""
        return {"input_size": [int(v) for v in self.input_size],
                "cells": [ax.cells for ax in self.axes],
                "centre": [round(float(ax.centre), 6) for ax in self.axes],
                "stride": [round(float(ax.stride), 6) for ax in self.axes],
                "receptive_field": [round(float(ax.receptive_field), 6) for ax in self.axes],
                "convention": "MONAI axis order (x, y[, z]) like the attention output; cell i of an axis is centred "
                              "at centre + i * stride input pixels, continuous coordinates (input pixel k spans "
                              "[k, k + 1)); between centres linear, outside them the edge cell's value is held"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttentionGeometry":
        """Inverse of :meth:`to_dict`; a malformed entry raises :class:`DeployError` naming the field."""
        try:
            keys = ("cells", "centre", "stride", "receptive_field")
            cols = [list(d[k]) for k in keys]
            size = [int(v) for v in d["input_size"]]
            if any(len(c) != len(size) for c in cols):
                raise ValueError(f"lengths differ: input_size {size}, " +
                                 ", ".join(f"{k} {c}" for k, c in zip(keys, cols)))
            axes = tuple(AxisGeometry(int(c), float(o), float(s), float(r)) for c, o, s, r in zip(*cols))
        except (KeyError, TypeError, ValueError) as e:
            raise DeployError(f"attention_geometry {dict(d)!r} is malformed ({type(e).__name__}: {e}); "
                              "re-export the model") from e
        return cls(tuple(size), axes)

    def check_grid(self, shape: Sequence[int]) -> None:
        """Raise :class:`DeployError` when an attention map of spatial ``shape`` is not this geometry's grid."""
        if tuple(int(v) for v in shape) != self.grid:
            raise DeployError(f"attention map is {tuple(int(v) for v in shape)} but the model's attention geometry "
                              f"declares a {self.grid} grid (MONAI order x, y[, z]): wrong manifest for this model?")


def interp_matrix(axis: AxisGeometry, input_size: int, n_out: int) -> np.ndarray:
    """(n_out, cells) linear-interpolation weights placing ``axis``'s cells on ``n_out`` output pixels that span
    the whole input (``input_size`` pixels): between neighbouring centres linear, outside the first / last centre
    the edge cell's value (clamped). Rows sum to 1."""
    if n_out < 1:
        raise DeployError(f"output size must be positive, got {n_out}")
    u = (np.arange(n_out, dtype=np.float64) + 0.5) * (input_size / n_out)  # output pixel centres, input pixels
    src = np.clip((u - axis.centre) / axis.stride, 0.0, axis.cells - 1)  # fractional cell index
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, axis.cells - 1)
    frac = src - i0
    w = np.zeros((n_out, axis.cells), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), 1.0 - frac)
    np.add.at(w, (rows, i1), frac)
    return w


def resample_attention(attention: np.ndarray, size: Sequence[int], geometry: AttentionGeometry | None = None
                       ) -> np.ndarray:
    """An attention map (*grid), MONAI order, → (*size) float64 on the image, each cell at its declared centre.

    ``geometry=None`` stretches the grid over the image (:meth:`AttentionGeometry.stretch`). ``size`` is in the
    map's axis order; the image is the whole model input, resized.
    """
    a = np.asarray(attention, dtype=np.float64)
    size = tuple(int(v) for v in size)
    if len(size) != a.ndim:
        raise DeployError(f"cannot resample a {a.ndim}-D attention map {a.shape} to a {len(size)}-D size {size}")
    geometry = geometry or AttentionGeometry.stretch(a.shape)
    geometry.check_grid(a.shape)
    for k, (ax, n_in, n_out) in enumerate(zip(geometry.axes, geometry.input_size, size)):
        w = interp_matrix(ax, n_in, n_out)
        a = np.moveaxis(np.tensordot(w, a, axes=([1], [k])), 0, k)
    return a


def geometry_from_manifest(manifest: Mapping[str, Any], *, where: str = "manifest") -> AttentionGeometry | None:
    """The manifest's ``attention_geometry``, or ``None`` with a warning for an export made before it existed
    (its maps are then stretched over the whole image, as those versions did)."""
    g = manifest.get("attention_geometry")
    if g is None:
        logger.warning("%s has no attention_geometry (exported by an older medsim): the attention grid is stretched "
                       "over the whole image, which misplaces patch-grid maps; re-export the run to place each "
                       "cell at its receptive-field centre", where)
        return None
    return AttentionGeometry.from_dict(g)
