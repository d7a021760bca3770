"""The MONAI transforms of training's eval preprocessing, reimplemented with NumPy on channel-first (C, *S) float32
arrays — one function each, shared by 2D images (:mod:`medsim.runtime.preprocess`) and 3D volumes
(:mod:`medsim.runtime.volume`).

MONAI's "area" resize is ``torch.nn.functional.interpolate(mode="area")`` = adaptive average pooling: output cell
``i`` of ``n_out`` averages input cells ``floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1``. It is
separable, and computed here from cumulative sums in float64 (exact for any factor, up- or downsampling).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsim.runtime.errors import DeployError

__all__ = ["area_resize", "to_rgb", "channel_max", "scale_range", "scale_minmax", "normalize_intensity"]


def _adaptive_avg_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling of float64 ``x`` along ``axis`` to ``n_out`` cells (PyTorch's bin edges)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    i = np.arange(n_out)
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
    x = np.moveaxis(x, axis, 0)
    cs = np.concatenate([np.zeros((1, *x.shape[1:]), dtype=np.float64), np.cumsum(x, axis=0, dtype=np.float64)])
    out = (cs[end] - cs[start]) / (end - start).reshape(-1, *([1] * (x.ndim - 1)))
    return np.moveaxis(out, 0, axis)


def area_resize(img: np.ndarray, size: tuple[int, ...] | list[int]) -> np.ndarray:
    """MONAI ``Resize(mode="area")``: (C, *S) → (C, *size) float32 by adaptive average pooling (any factor)."""
    size = tuple(int(s) for s in size)
    if img.ndim != len(size) + 1:
        raise DeployError(f"cannot resize an array of shape {img.shape} to spatial size {size}")
    if any(s < 1 for s in size):
        raise DeployError(f"spatial size must be positive, got {size}")
    if tuple(img.shape[1:]) == size:
        return img.astype(np.float32, copy=False)
    out = img.astype(np.float64)
    for ax, n in enumerate(size, start=1):
        out = _adaptive_avg_axis(out, ax, n)
    return out.astype(np.float32)


def to_rgb(img: np.ndarray) -> np.ndarray:
    if img.shape[0] == 2:
        img = img[:1]
    elif img.shape[0] == 4:
        img = img[:3]
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    return img


def channel_max(img: np.ndarray) -> np.ndarray:
    return img[: min(3, img.shape[0])].max(axis=0, keepdims=True) if img.shape[0] > 1 else img


def scale_range(img: np.ndarray, scale: dict[str, Any]) -> np.ndarray:
    a0, a1 = (float(v) for v in scale["from"])
    b0, b1 = (float(v) for v in scale["to"])
    if a1 - a0 == 0.0:
        return img - np.float32(a0) + np.float32(b0)
    out = (img - np.float32(a0)) / np.float32(a1 - a0)
    out = out * np.float32(b1 - b0) + np.float32(b0)
    if scale.get("clip", False):
        out = np.clip(out, b0, b1)
    return out.astype(np.float32, copy=False)


def scale_minmax(img: np.ndarray, scale: dict[str, Any] | None) -> np.ndarray:
    to = (scale or {}).get("to", [0.0, 1.0])
    minv, maxv = (None if v is None else float(v) for v in to)
    lo, hi = img.min(), img.max()
    if lo == hi:
        return img * np.float32(minv) if minv is not None else img
    norm = (img - lo) / (hi - lo)
    if minv is None or maxv is None:
        return norm
    return (norm * np.float32(maxv - minv) + np.float32(minv)).astype(np.float32, copy=False)


def normalize_intensity(img: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    mean, std = prep.get("mean"), prep.get("std")
    channel_wise = bool(prep.get("channel_wise", False))

    def one(x: np.ndarray, sub: Any, div: Any) -> np.ndarray:
        s = np.float32(x.mean()) if sub is None else np.float32(sub)
        d = np.float32(x.std()) if div is None else np.float32(div)
        return (x - s) / (d if d != 0 else np.float32(1.0))

    if channel_wise:
        n = img.shape[0]
        for name, v in (("mean", mean), ("std", std)):
            if isinstance(v, list) and len(v) != n:
                raise DeployError(f"manifest preprocessing {name} has {len(v)} values but the image has {n} "
                                  "channels")
        subs = mean if isinstance(mean, list) else [mean] * n
        divs = std if isinstance(std, list) else [std] * n
        return np.stack([one(img[c], subs[c], divs[c]) for c in range(n)]).astype(np.float32, copy=False)
    if isinstance(mean, list) or isinstance(std, list):
        raise DeployError("manifest preprocessing has per-channel mean/std but channel_wise is false")
    return one(img, mean, std).astype(np.float32, copy=False)
