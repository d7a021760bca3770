"""Optimiser parameter groups as the DSL authors train: a small learning rate for the pretrained body (trunk and
attention), a larger one for the freshly initialised head (embedding, classifier, a loss's learnable parameters).

DSL (Adiga Vasudeva et al., MIDL 2022): Adam, lr 1e-5 and weight decay 1e-4 for the trunk and attention; the
embedding layer learns faster. ``torch.optim.Adam(param_groups(net, loss.parameters(), trunk_lr=1e-5,
head_lr=1e-3, weight_decay=1e-4))``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from monai.utils import look_up_option
from torch import nn

__all__ = ["param_groups"]


def param_groups(network: nn.Module, extra: Iterable[nn.Parameter] | nn.Module = (), *, trunk_lr: float,
                 head_lr: float, weight_decay: float = 0.0, head_weight_decay: float = 0.0,
                 body: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Two parameter groups for a ``torch.optim`` optimiser: ``"trunk"`` and ``"head"``.

    Args:
        network: an :class:`~medsim.nn.base.EmbedderBase` (its :attr:`trunk` is in the trunk group), or any module
            (then only ``body`` decides).
        extra: more parameters for the head group (e.g. a loss's learnable margins ``loss.parameters()``).
        trunk_lr / weight_decay: learning rate and weight decay of the trunk group.
        head_lr / head_weight_decay: those of the head group.
        body: names of ``network``'s submodules that join the trunk group besides the trunk; default
            ``("attention",)`` when ``network`` has an ``attention`` submodule (DSL's "trunk + attention"), else
            none.

    Returns:
        ``[{"name": "trunk", "params", "lr", "weight_decay"}, {"name": "head", ...}]``: every trainable parameter of
        ``network`` and ``extra`` in exactly one group (a shared parameter in the first); parameters with
        ``requires_grad=False`` are left out, and so is a group left empty.

    Raises:
        ValueError: a ``body`` name that is no submodule (with "did you mean"), a parameter of ``extra`` that is
            also the network's, or no trainable parameter at all.
    """
    children = dict(network.named_children())
    if body is None:
        body = ("attention",) if isinstance(children.get("attention"), nn.Module) else ()
    trunk_modules = [look_up_option(name, children) for name in body]
    if hasattr(network, "trunk") and isinstance(network.trunk, nn.Module):
        trunk_modules.insert(0, network.trunk)
    seen: set[int] = set()

    def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        out = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    trunk = trainable(p for m in trunk_modules for p in m.parameters())
    head = trainable(network.parameters())
    extra = list(extra.parameters() if isinstance(extra, nn.Module) else extra)
    shared = [p for p in extra if id(p) in seen]
    if shared:
        raise ValueError(f"{len(shared)} of the extra parameters (shapes {[tuple(p.shape) for p in shared[:4]]}) "
                         "belong to the network already; pass only parameters from outside it (e.g. a loss's)")
    head += trainable(extra)
    groups = [{"name": "trunk", "params": trunk, "lr": trunk_lr, "weight_decay": weight_decay},
              {"name": "head", "params": head, "lr": head_lr, "weight_decay": head_weight_decay}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(network).__name__} and extra have no parameter with requires_grad=True")
    return groups
