"""The one Embedder contract every medsim model follows: :class:`EmbedderBase` and its output, :class:`EmbedderOutput`.

Export, retrieval, localization and MONAI Label read every model the same way::

    out = model(x)                        # x (B, C, *spatial), checked once here
    out["embedding"]                      # (B, D): L2-normalised (cosine similarity = dot product)
    out["attention"]                      # (B, 1, *s) in [0, 1] at feature resolution
    model.attention_geometry(input_size)  # where those cells sit on the input (medsim.nn.geometry)
    out.get("logits")                     # (B, n_classes) when the model classifies
    out.get("features")                   # (B, F, *s_trunk) the trunk's dense features, when return_features
    model.trunk                           # the feature extractor (B, C, *spatial) -> (B, F, *s)
    model.embedding_dim                   # D

A model may add method-specific keys (ABE's ``learner_embeddings``, loss attention's ``patch_weights``, …); the
keys above mean the same thing in every model.
"""

from __future__ import annotations

from typing import ClassVar, Sequence, TypedDict

import torch
from torch import nn

from medsim.nn.geometry import AttentionGeometry

__all__ = ["EmbedderOutput", "EmbedderBase", "check_batch"]


class EmbedderOutput(TypedDict, total=False):
    """What every model's ``forward`` returns (a plain ``dict`` at run time, so ONNX export and TorchScript see
    tensors only). ``embedding`` and ``attention`` are always present; models add their own keys."""

    embedding: torch.Tensor  # (B, D), L2-normalised
    attention: torch.Tensor  # (B, 1, *s) in [0, 1]; its placement on the input: model.attention_geometry(size)
    logits: torch.Tensor  # (B, n_classes), optional
    features: torch.Tensor  # (B, F, *s_trunk) the trunk's output, only when model.return_features is on


def check_batch(x: torch.Tensor, spatial_dims: int, in_channels: int | None = None) -> None:
    """The one input check: ``x`` must be a (B, C, *spatial) batch with ``spatial_dims`` spatial axes (and
    ``in_channels`` channels when given).

    Raises:
        ValueError: naming the expected layout and the shape received.
    """
    if x.ndim == spatial_dims + 2 and (in_channels is None or x.shape[1] == in_channels):
        return
    if in_channels is None:
        raise ValueError(f"expected a {spatial_dims + 2}-D (B, C, *spatial) batch, got shape {tuple(x.shape)}")
    raise ValueError(f"expected a (B, {in_channels}, {', '.join(['*'] * spatial_dims)}) batch, "
                     f"got shape {tuple(x.shape)}")


class EmbedderBase(nn.Module):
    """Base of every medsim model: checks the input once, then calls :meth:`compute`.

    Subclasses set ``spatial_dims``, ``in_channels`` and ``embedding_dim`` in ``__init__``, register their feature
    extractor as a submodule named by ``trunk_key`` (the name stays as it was when the model was first released,
    so its ``state_dict`` keys — and every checkpoint and export — are unchanged; :attr:`trunk` reads it under one
    name), and implement :meth:`compute` and :meth:`attention_geometry`.

    Dense features (for pixel-wise methods): with :attr:`return_features` on (the ``return_features`` argument
    of every model, or set on a built model), ``forward`` also returns ``features``, the trunk's output
    (B, F, *s_trunk) — the very tensor the model's attention / pooling head reads, same dtype and device, in the
    autograd graph. ``compute`` hands it to :meth:`add_features`. Off by default: the outputs, the
    ``state_dict`` (a plain attribute, no buffer) and ONNX exports are then exactly those of a model without it.
    *s_trunk is the ``attention`` grid *s for every model except :class:`~medsim.nn.LossAttentionNet`, whose
    attention sits on the coarser patch grid.
    """

    #: name of the trunk submodule in the state_dict (``backbone`` / ``spatial`` / ``trunk`` by model)
    trunk_key: ClassVar[str] = "trunk"
    #: constructor arguments that only initialise weights (a pretrained-weights file): a network rebuilt from a run
    #: record to receive its checkpoint is built without them (:func:`medsim.engines.runs.build_spec`), so the file
    #: they name need not exist where the run is exported or evaluated
    init_only_args: ClassVar[tuple[str, ...]] = ()
    spatial_dims: int = 2
    in_channels: int
    embedding_dim: int
    #: add the trunk's dense ``features`` (B, F, *s_trunk) to the output (see the class docstring)
    return_features: bool = False

    def __init__(self, *, return_features: bool = False):
        super().__init__()
        self.return_features = bool(return_features)

    @property
    def trunk(self) -> nn.Module:
        """The feature extractor (B, C, *spatial) -> (B, F, *s) (read-only; registered as ``trunk_key``)."""
        return self._modules[self.trunk_key]

    def __setattr__(self, name: str, value: object) -> None:
        if name == "trunk" and self.trunk_key != "trunk":
            raise AttributeError(f"{type(self).__name__}.trunk is a read-only alias of '{self.trunk_key}' (the name "
                                 f"its checkpoints use): assign {self.trunk_key} instead")
        super().__setattr__(name, value)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a (B, in_channels, *spatial) batch of this model's dimensionality."""
        check_batch(x, self.spatial_dims, self.in_channels)

    def forward(self, x: torch.Tensor) -> EmbedderOutput:
        self.check_input(x)
        out = self.compute(x)
        if self.return_features and "features" not in out:
            raise NotImplementedError(f"{type(self).__name__}.compute does not report its dense features: pass the "
                                      f"trunk's output to self.add_features(out, features), or use "
                                      f"return_features=False")
        return out

    def compute(self, x: torch.Tensor) -> EmbedderOutput:  # pragma: no cover - abstract
        """The model on a checked batch (see :class:`EmbedderOutput`)."""
        raise NotImplementedError

    def add_features(self, out: EmbedderOutput, features: torch.Tensor) -> EmbedderOutput:
        """``out`` with ``features`` (the trunk's output (B, F, *s_trunk), as the head read it: not a copy) added
        when :attr:`return_features` is on, else ``out`` unchanged. Returns ``out`` (changed in place)."""
        if self.return_features:
            out["features"] = features
        return out

    def attention_geometry(self, input_size: Sequence[int]) -> AttentionGeometry:  # pragma: no cover - abstract
        """Where the ``attention`` cells sit on an input of spatial ``input_size`` (x, y[, z])."""
        raise NotImplementedError
