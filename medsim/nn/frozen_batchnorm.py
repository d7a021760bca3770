"""Frozen batch normalisation: BatchNorm that always normalises with its stored statistics and learns nothing.

For a trunk initialised from (self-supervised) weights and fine-tuned with small batches, where batch statistics
are noisy and would overwrite the pretrained ones (Detectron2 / torchvision ``FrozenBatchNorm2d``).
:func:`freeze_batchnorm` swaps every ``nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) of a module for a
:class:`FrozenBatchNorm` holding the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenBatchNorm", "freeze_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FrozenBatchNorm(nn.Module):
    """BatchNorm in eval mode, whatever the module's mode: ``y = (x - running_mean) / sqrt(running_var + eps) *
    weight + bias`` per channel, the very ``F.batch_norm`` call of an ``nn.BatchNorm*d`` in eval mode (so outputs are
    equal and ONNX exports one ``BatchNormalization`` node).

    ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked`` are buffers: nothing gets
    gradients or is updated by ``.train()`` forward passes, and the ``state_dict`` keys are exactly those of the
    BatchNorm it replaces — checkpoints load in either direction (``num_batches_tracked`` is kept, never counted).

    Args:
        num_features: C.
        eps: added to the variance, as in BatchNorm.
        affine: hold ``weight`` / ``bias`` (False: none, as a BatchNorm with ``affine=False``).
        input_ndims: the input dimensionalities accepted (BatchNorm2d: ``(4,)``; BatchNorm1d: ``(2, 3)``).

    Shapes: x (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, affine: bool = True,
                 input_ndims: tuple[int, ...] = (4,)):
        super().__init__()
        self.num_features, self.eps, self.input_ndims = int(num_features), float(eps), tuple(input_ndims)
        self.register_buffer("weight", torch.ones(num_features) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features) if affine else None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, name: str = "") -> FrozenBatchNorm:
        """A frozen copy of ``bn`` (same values, dtype and device); ``name`` is its path, for the error.

        Raises:
            ValueError: ``bn`` keeps no running statistics (``track_running_stats=False``): it normalises every
                batch with its own statistics, there is nothing to freeze.
        """
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot freeze {name or 'the module'} ({bn}): it keeps no running statistics "
                             "(track_running_stats=False)")
        ndims = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
        kind = next((k for k in ndims if isinstance(bn, k)), None)
        frozen = cls(bn.num_features, bn.eps, affine=bn.affine, input_ndims=ndims[kind] if kind else (2, 3, 4, 5))
        with torch.no_grad():
            for key, _ in frozen.named_buffers(recurse=False):
                setattr(frozen, key, getattr(bn, key).detach().clone())
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in self.input_ndims:
            raise ValueError(f"expected a {' or '.join(f'{n}-D' for n in self.input_ndims)} (B, C, ...) input, "
                             f"got shape {tuple(x.shape)}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` / ``SyncBatchNorm`` in ``module`` by a :class:`FrozenBatchNorm` with
    its current values (in place). Returns ``module``, or the frozen module when ``module`` itself is a BatchNorm.

    Raises:
        ValueError: a BatchNorm without running statistics, named by its path.
    """
    if isinstance(module, _BATCHNORMS):
        return FrozenBatchNorm.from_batchnorm(module)
    for name, child in list(module.named_modules()):
        for key, sub in list(child.named_children()):
            if isinstance(sub, _BATCHNORMS):
                setattr(child, key, FrozenBatchNorm.from_batchnorm(sub, f"{name}.{key}" if name else key))
    return module
