"""Large images tile by tile: any model with ``logits`` (e.g. :class:`~medsim.nn.fine_grained_mil.FineGrainedMIL`)
over the tiles of a histology TIFF or an array, with instance boxes mapped back to level-0 image pixels.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from torch import nn

from medsim.nn.fine_grained_mil import size_pair

__all__ = ["tile_predictions"]


@torch.no_grad()
def tile_predictions(model: nn.Module, image: str | os.PathLike | Any, *, tile_size: int | Sequence[int] = 512,
                     stride: int | Sequence[int] | None = None, level: int = 0, input_size: Sequence[int] | None = None,
                     transform: Callable | None = None, batch_size: int = 8, tissue_threshold: float = 0.1,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run a :class:`FineGrainedMIL` (any Embedder with ``logits``) over the tiles of a large image.

    A histology TIFF is tiled with :func:`medsim.data.histology.patch_grid` (background tiles dropped by its
    tissue rule) and read with :func:`~medsim.data.histology.patch_dataset` (only the TIFF tiles a patch touches
    are decoded); a NumPy array (H, W, C) uint8 is tiled on the same regular grid with every tile kept. Each tile
    (rows × columns) is transposed to MONAI's (C, x = column, y = row) order — the order of PIL-loaded training
    images — and preprocessed by ``transform`` (default: the bundle's eval pipeline
    ``rgb2d_transforms(input_size, load=False)``: [0, 255] → [0, 1], area resize, ImageNet normalisation).

    Args:
        model: the trained network (put in eval mode here).
        image: TIFF path or (H, W, C) array.
        tile_size: (h, w) tile in pixels of ``level`` (one int: square).
        stride: tile step (default ``tile_size``: no overlap).
        level: pyramid level to read (TIFF only).
        input_size: the model's (X, Y) input (default: the tile's (w, h), no resize).
        transform: callable on ``{"image": (C, x, y) float}`` returning the same dict (MONAI dict transform).
        batch_size: tiles per forward pass.
        tissue_threshold: TIFF tiles with a smaller tissue fraction are skipped.

    Returns:
        ``{"locations": (T, 2) level-0 (row, column) of each tile's top-left, "probabilities": (T, n_classes)
        softmax of ``logits``, "embeddings": (T, D), "attention": (T, 1, h, w), "instance_boxes": (T, N, 4)
        ``(x0, y0, x1, y1)`` in level-0 image pixels with x = column, y = row (None without boxes),
        "image_probabilities": (n_classes,) mean over tiles, "prediction": int}``. No tiles: ``ValueError``.
    """
    import numpy as np

    from medsim.data.transforms import rgb2d_transforms

    th, tw = size_pair(tile_size, "tile_size")
    if isinstance(image, (str, os.PathLike)):
        from medsim.data.histology import patch_dataset, patch_grid, tiff_info

        items = patch_grid(image, (th, tw), level=level, stride=stride, tissue_threshold=tissue_threshold)
        info = tiff_info(image)
        ratio = info["downsamples"][level]
        ds = patch_dataset(items)
        tiles = ((np.asarray(ds[i]["image"]), tuple(items[i]["location"])) for i in range(len(items)))
        n_tiles = len(items)
    else:
        arr = np.asarray(image)
        if arr.ndim != 3:
            raise ValueError(f"expected an (H, W, C) image array, got shape {arr.shape}")
        sy, sx = size_pair(stride if stride is not None else (th, tw), "stride")
        locs = [(r, c) for r in range(0, arr.shape[0] - th + 1, sy) for c in range(0, arr.shape[1] - tw + 1, sx)]
        ratio = 1.0
        tiles = ((np.moveaxis(arr[r:r + th, c:c + tw], -1, 0), (r, c)) for r, c in locs)
        n_tiles = len(locs)
    if not n_tiles:
        raise ValueError(f"no {th}x{tw} tiles in {image if isinstance(image, (str, os.PathLike)) else 'the array'}"
                         " (image smaller than a tile, or no tile with enough tissue)")
    size = tuple(input_size) if input_size is not None else (tw, th)
    transform = transform or rgb2d_transforms(size, train=False, load=False)
    model = model.eval().to(device)
    outs: dict[str, list] = {"locations": [], "probabilities": [], "embeddings": [], "attention": [], "boxes": []}

    def run(batch: list[torch.Tensor]) -> None:
        out = model(torch.stack(batch).to(device))
        outs["probabilities"].append(torch.softmax(out["logits"], 1).cpu())
        outs["embeddings"].append(out["embedding"].cpu())
        outs["attention"].append(out["attention"].cpu())
        if "instance_boxes" in out:
            outs["boxes"].append(out["instance_boxes"].cpu())

    batch: list[torch.Tensor] = []
    for chw, loc in tiles:  # (C, rows, cols) -> (C, x = column, y = row)
        img = transform({"image": torch.as_tensor(np.ascontiguousarray(chw.swapaxes(1, 2)), dtype=torch.float32)})
        batch.append(torch.as_tensor(img["image"]))
        outs["locations"].append(loc)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    probs = torch.cat(outs["probabilities"]).numpy()
    boxes = None
    if outs["boxes"] and outs["boxes"][0].shape[1]:
        b = torch.cat(outs["boxes"]).numpy().astype(np.float64)  # model-input pixels (x, y) of each tile
        locs = np.asarray(outs["locations"], dtype=np.float64)  # level-0 (row, column)
        fx, fy = tw / size[0] * ratio, th / size[1] * ratio  # model x -> level-0 columns, y -> rows
        boxes = b * np.array([fx, fy, fx, fy]) + np.stack([locs[:, 1], locs[:, 0]] * 2, -1)[:, None]
    mean = probs.mean(0)
    return {"locations": np.asarray(outs["locations"], dtype=np.int64), "probabilities": probs,
            "embeddings": torch.cat(outs["embeddings"]).numpy(), "attention": torch.cat(outs["attention"]).numpy(),
            "instance_boxes": boxes, "image_probabilities": mean, "prediction": int(mean.argmax())}
