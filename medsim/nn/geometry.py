"""Derive an attention map's geometry (:class:`medsim.runtime.geometry.AttentionGeometry`) from the layers that
make it: every convolution and pooling on the path from the input to the map, with its kernel, stride, padding
and dilation as they are in the module (so a trunk whose strides were removed after construction, like loss-based
attention's, is read as it runs).

Per layer and axis, output cell ``j`` of a layer with kernel ``k``, dilation ``d``, stride ``s``, padding ``p`` is
centred on its input's index position ``s·j − p + d·(k − 1)/2`` and sees ``d·(k − 1) + 1`` input cells; chained
layers compose (strides multiply, offsets and receptive fields accumulate in input pixels). A bilinear resize from
``n`` to ``m`` cells (FineGrainedMIL's global branch) maps cell ``j`` to ``(j + 0.5)·n/m − 0.5``.

Walk rules (:func:`trace`): convolutions / poolings change the grid; ``nn.Sequential`` (MONAI ``Convolution``
included) composes its children in order; MONAI ``ResNetBlock`` / ``ResNetBottleneck`` follow the main path and
check that the shortcut lands on the same grid; ``nn.ModuleList`` and any other module with children are parallel
branches that must keep the grid (attention modules do, by contract) — their receptive field is the widest
branch's; leaves without a spatial kernel (norms, activations) change nothing. A module that changes the grid in a
way these rules cannot follow raises ``NotImplementedError`` naming it. Global operations inside attention modules
(self-attention, global pooling) are not counted in the receptive field: it is the convolutional window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from medsim.runtime.geometry import AttentionGeometry, AxisGeometry

__all__ = ["AttentionGeometry", "Resize", "trace", "trace_geometry"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass(frozen=True)
class Resize:
    """A bilinear / trilinear resize (``align_corners=False``) to ``size`` on the path to the map (not a module:
    e.g. ``F.interpolate`` inside ``forward``)."""

    size: tuple[int, ...]


@dataclass(frozen=True)
class _Axis:
    size: int  # cells on this axis at this point of the network
    stride: float  # input pixels between neighbouring cells
    offset: float  # index position of cell 0's centre in input pixels (input pixel k is centred at k)
    rf: float  # receptive field in input pixels


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _window(axes: tuple[_Axis, ...], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], ceil_mode: bool, name: str) -> tuple[_Axis, ...]:
    out = []
    for a, k, s, p, d in zip(axes, kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        n = (a.size + 2 * p - span) / s
        size = (int(-(-(a.size + 2 * p - span) // s)) if ceil_mode else int((a.size + 2 * p - span) // s)) + 1
        if n < 0 or size < 1:
            raise ValueError(f"{name}: a {a.size}-cell input is smaller than its {span}-cell window (padding {p}): "
                             "use a larger input")
        out.append(_Axis(size, a.stride * s, a.offset + a.stride * (d * (k - 1) / 2.0 - p), a.rf + (span - 1) * a.stride))
    return tuple(out)


def trace(module: nn.Module | Resize, axes: tuple[_Axis, ...]) -> tuple[_Axis, ...]:
    """The grid after ``module`` for the grid ``axes`` before it (see the module docstring for the rules)."""
    n = len(axes)
    name = type(module).__name__
    if isinstance(module, Resize):
        size = _tuple(module.size, n)
        return tuple(a if m == a.size else _Axis(m, a.stride * a.size / m, a.offset + a.stride * (0.5 * a.size / m - 0.5),
                                                   a.rf + a.stride) for a, m in zip(axes, size))
    if isinstance(module, _CONVS):
        if isinstance(module.padding, str):
            if module.padding != "same" or any(s != 1 for s in module.stride):
                raise NotImplementedError(f"{name}: padding={module.padding!r} with stride {module.stride}")
            padding = tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
        else:
            padding = module.padding
        return _window(axes, module.kernel_size, module.stride, padding, module.dilation, False, name)
    if isinstance(module, _POOLS):
        stride = module.stride if module.stride is not None else module.kernel_size
        return _window(axes, _tuple(module.kernel_size, n), _tuple(stride, n), _tuple(module.padding, n),
                       _tuple(getattr(module, "dilation", 1), n), bool(module.ceil_mode), name)
    if isinstance(module, nn.Sequential):
        for child in module:
            axes = trace(child, axes)
        return axes
    if isinstance(module, (ResNetBlock, ResNetBottleneck)):
        main = axes
        for conv in ("conv1", "conv2", "conv3"):
            if hasattr(module, conv):
                main = trace(getattr(module, conv), main)
        if module.downsample is not None and isinstance(module.downsample, nn.Module):
            short = trace(module.downsample, axes)
            if any((s.size, s.stride, s.offset) != (m.size, m.stride, m.offset) for s, m in zip(short, main)):
                raise NotImplementedError(f"{name}: the shortcut's grid {short} differs from the main path's {main}")
        return main
    children = list(module.children())
    if not children:
        if any(isinstance(module, t) for t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                                                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                                                nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                                                nn.Upsample)):
            raise NotImplementedError(f"{name} changes the grid in a way attention geometry does not follow")
        return axes  # norms, activations, dropout, identity
    # parallel branches (ModuleList, attention modules): each must keep the grid; the widest window counts
    branches = [trace(c, axes) for c in children]
    for b in branches:
        if any((x.size, x.stride, x.offset) != (a.size, a.stride, a.offset) for x, a in zip(b, axes)):
            raise NotImplementedError(f"{name}: a child changes the grid and {name} has no geometry rule (give the "
                                      "model an attention_geometry method that traces its stages in order)")
    return tuple(replace(a, rf=max(b[i].rf for b in branches)) for i, a in enumerate(axes))


def trace_geometry(input_size: Sequence[int], *stages: nn.Module | Resize) -> AttentionGeometry:
    """The :class:`AttentionGeometry` of the map that ``stages`` (applied in order) make from an input of spatial
    ``input_size`` (MONAI order x, y[, z])."""
    size = tuple(int(v) for v in input_size)
    if not size or min(size) < 1:
        raise ValueError(f"input_size must be positive spatial sizes (x, y[, z]), got {list(input_size)}")
    axes = tuple(_Axis(n, 1.0, 0.0, 1.0) for n in size)
    for stage in stages:
        if stage is not None:
            axes = trace(stage, axes)
    return AttentionGeometry(size, tuple(AxisGeometry(a.size, a.offset + 0.5, a.stride, a.rf) for a in axes))
