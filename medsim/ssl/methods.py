"""Joint-embedding self-supervised methods on medsim's Embedder contract.

Every method wraps an encoder that returns ``{"embedding": (B, D) L2-normalised, ...}`` (:class:`medsim.nn.Embedder`
or any module with that output) and puts its projector / predictor on top of that embedding: the embedding is the
representation that export and retrieval ship, and :attr:`JointEmbedding.encoder`'s ``state_dict`` is what a
downstream run loads.

``forward(views)`` takes a list of V >= 2 batches (B, C, *S) of the same B images (multi-crop: the spatial sizes may
differ) and returns the dict the matching loss in :mod:`medsim.ssl.losses` reads.

Momentum / target branches (MoCo v2, BYOL) are deep copies with ``requires_grad=False``; they stay in
``parameters()`` (and the ``state_dict``, so a resumed run keeps them), so build the optimiser from
:meth:`JointEmbedding.trainable_parameters` (= ``filter(lambda p: p.requires_grad, model.parameters())``).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsim.nn.collectives import gather_batch

__all__ = ["projection_head", "JointEmbedding", "SimCLR", "MoCoV2", "BYOL", "SimSiam", "BarlowTwins", "VICReg",
           "WMSE", "ema_update"]


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, *, n_layers: int = 2, batch_norm: bool = True,
                    last_batch_norm: bool = False) -> nn.Sequential:
    """MLP head: ``n_layers - 1`` blocks of Linear(→hidden) [+ BatchNorm1d] + ReLU, then Linear(→out) [+ BN].

    Shapes: (B, in_dim) -> (B, out_dim). SimCLR/BYOL/W-MSE use 2 layers with BN, MoCo v2 2 layers without BN,
    SimSiam 3 layers with a last BN, Barlow Twins / VICReg 3 layers.
    """
    if n_layers < 1:
        raise ValueError(f"a projection head needs n_layers >= 1, got n_layers={n_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        layers += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        layers += [nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``θ_target ← m θ_target + (1 - m) θ_online`` for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class JointEmbedding(nn.Module):
    """Base of the methods: holds :attr:`encoder`, checks the views once, embeds them."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        dim = getattr(encoder, "embedding_dim", None)
        if dim is None:
            raise ValueError(f"the encoder must expose embedding_dim (D), got a {type(encoder).__name__} without it")
        self.embedding_dim = int(dim)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should update (momentum / target branches excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def check_views(views: Sequence[torch.Tensor]) -> None:
        """``views`` must be a list of >= 2 batches with the same batch size."""
        if isinstance(views, torch.Tensor) or len(views) < 2:
            got = f"a tensor of shape {tuple(views.shape)}" if isinstance(views, torch.Tensor) else f"{len(views)}"
            raise ValueError(f"expected a list of V >= 2 views (B, C, *S), got {got}")
        sizes = [v.shape[0] for v in views]
        if len(set(sizes)) != 1:
            raise ValueError(f"every view must hold the same B images, got batch sizes {sizes}")

    def embed(self, x: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """(B, C, *S) -> the encoder's (B, D) embedding."""
        return (encoder or self.encoder)(x)["embedding"]

    def forward(self, views: list[torch.Tensor]) -> dict:
        raise NotImplementedError


class SimCLR(JointEmbedding):
    """SimCLR (Chen et al., ICML 2020): projector g (Linear-BN-ReLU-Linear) on the embedding.

    forward: V views (B, C, *S) -> ``{"z": [z_1 .. z_V]}``, each (B, projection_dim) (the NT-Xent loss
    normalises them).
    """

    def __init__(self, encoder: nn.Module, projection_dim: int = 128, hidden_dim: int = 512):
        super().__init__(encoder)
        self.projector = projection_head(self.embedding_dim, hidden_dim, projection_dim)

    def forward(self, views: list[torch.Tensor]) -> dict:
        self.check_views(views)
        return {"z": [self.projector(self.embed(v)) for v in views]}


class MoCoV2(JointEmbedding):
    """MoCo v2 (He et al., CVPR 2020; Chen et al., arXiv:2003.04297): query encoder + MLP head (Linear-ReLU-Linear),
    a momentum copy of both (``m`` EMA, updated at the start of each training-mode forward) and a queue of
    ``queue_size`` keys (a buffer ``queue`` (K, P) with pointer ``queue_ptr``).

    forward: views[0] is the query view, views[1] the key view; views[2:] (optional) are encoded by the momentum
    branch as support views for false-negative elimination. Returns ``{"q": (B, P), "k": (B, P) no grad,
    "queue": (K, P) the queue as it was before this batch, "support": [(B, P) no grad, ...]}``, all L2-normalised.
    In training mode the batch's keys are then enqueued: the loss reads the snapshot ``queue``, so the keys
    join the queue only after the loss of their own batch (MoCo's ``_dequeue_and_enqueue`` after the logits).
    """

    def __init__(self, encoder: nn.Module, projection_dim: int = 128, hidden_dim: int = 512,
                 queue_size: int = 4096, momentum: float = 0.99):
        super().__init__(encoder)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got momentum={momentum}")
        self.projector = projection_head(self.embedding_dim, hidden_dim, projection_dim, batch_norm=False)
        self.momentum = momentum
        self.momentum_encoder = _frozen_copy(self.encoder)
        self.momentum_projector = _frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[torch.Tensor]) -> dict:
        self.check_views(views)
        if self.training:
            ema_update(self.momentum_encoder, self.encoder, self.momentum)
            ema_update(self.momentum_projector, self.projector, self.momentum)
        q = F.normalize(self.projector(self.embed(views[0])), dim=1)
        with torch.no_grad():
            keys = [F.normalize(self.momentum_projector(self.embed(v, self.momentum_encoder)), dim=1)
                    for v in views[1:]]
        out = {"q": q, "k": keys[0], "queue": self.queue.clone(), "support": keys[1:]}
        if self.training:
            self.enqueue(keys[0])
        return out

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, P) over the oldest queue entries (ring buffer). In a data-parallel run the keys of
        every process are gathered first, in rank order (MoCo's ``concat_all_gather``), so every process holds the
        queue of one process that saw the whole batch. A batch larger than the queue keeps its last K keys."""
        keys = gather_batch(keys.detach()).to(self.queue.dtype)  # under bf16 autocast the keys come in bf16
        k, n = self.queue.shape[0], keys.shape[0]
        if n > k:
            keys = keys[-k:]
        idx = (self.queue_ptr + n - keys.shape[0] + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + n) % k)


class BYOL(JointEmbedding):
    """BYOL (Grill et al., NeurIPS 2020): online projector + predictor (Linear-BN-ReLU-Linear each) and a target
    (encoder + projector) updated as an EMA with rate ``momentum`` (τ) at the start of each training-mode forward.

    forward: V views -> ``{"p": [p_1 .. p_V] (B, P), "z_target": [z'_1 .. z'_V] (B, P) under no_grad}``.
    """

    def __init__(self, encoder: nn.Module, projection_dim: int = 128, hidden_dim: int = 512,
                 momentum: float = 0.99):
        super().__init__(encoder)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got momentum={momentum}")
        self.projector = projection_head(self.embedding_dim, hidden_dim, projection_dim)
        self.predictor = projection_head(projection_dim, hidden_dim, projection_dim)
        self.momentum = momentum
        self.target_encoder = _frozen_copy(self.encoder)
        self.target_projector = _frozen_copy(self.projector)

    def update_target(self) -> None:
        """The EMA step of every target module (training mode only): ``θ' ← τ θ' + (1 - τ) θ``."""
        if self.training:
            ema_update(self.target_encoder, self.encoder, self.momentum)
            ema_update(self.target_projector, self.projector, self.momentum)

    def forward(self, views: list[torch.Tensor]) -> dict:
        self.check_views(views)
        self.update_target()
        p = [self.predictor(self.projector(self.embed(v))) for v in views]
        with torch.no_grad():
            z_target = [self.target_projector(self.embed(v, self.target_encoder)) for v in views]
        return {"p": p, "z_target": z_target}


class SimSiam(JointEmbedding):
    """SimSiam (Chen & He, CVPR 2021): projector (3 layers, BN on the output) and a bottleneck predictor
    (Linear-BN-ReLU-Linear, hidden ``predictor_hidden_dim``). The stop-gradient lives in
    :class:`~medsim.ssl.losses.SimSiamLoss`, where the paper writes it (D(p1, stopgrad(z2))).

    forward: V views -> ``{"p": [p_1 .. p_V], "z": [z_1 .. z_V]}``, each (B, P).
    """

    def __init__(self, encoder: nn.Module, projection_dim: int = 128, hidden_dim: int = 512,
                 predictor_hidden_dim: int | None = None):
        super().__init__(encoder)
        self.projector = projection_head(self.embedding_dim, hidden_dim, projection_dim, n_layers=3,
                                         last_batch_norm=True)
        self.predictor = projection_head(projection_dim, predictor_hidden_dim or max(projection_dim // 4, 1),
                                         projection_dim)

    def forward(self, views: list[torch.Tensor]) -> dict:
        self.check_views(views)
        z = [self.projector(self.embed(v)) for v in views]
        return {"p": [self.predictor(zi) for zi in z], "z": z}


class _ProjectedViews(JointEmbedding):
    """A projector on the embedding, ``{"z": [z_1 .. z_V]}`` out (Barlow Twins, VICReg, W-MSE)."""

    n_layers = 3

    def __init__(self, encoder: nn.Module, projection_dim: int = 128, hidden_dim: int = 512):
        super().__init__(encoder)
        self.projector = projection_head(self.embedding_dim, hidden_dim, projection_dim, n_layers=self.n_layers)

    def forward(self, views: list[torch.Tensor]) -> dict:
        self.check_views(views)
        return {"z": [self.projector(self.embed(v)) for v in views]}


class BarlowTwins(_ProjectedViews):
    """Barlow Twins (Zbontar et al., ICML 2021): 3-layer projector (Linear-BN-ReLU ×2, Linear).

    forward: V views -> ``{"z": [z_1 .. z_V]}``, each (B, projection_dim).
    """


class VICReg(_ProjectedViews):
    """VICReg (Bardes et al., ICLR 2022): 3-layer "expander" (Linear-BN-ReLU ×2, Linear).

    forward: V views -> ``{"z": [z_1 .. z_V]}``, each (B, projection_dim).
    """


class WMSE(_ProjectedViews):
    """W-MSE (Ermolov et al., ICML 2021): 2-layer projector (Linear-BN-ReLU-Linear); the whitening of groups of
    ``w_size`` samples (Cholesky) is part of :class:`~medsim.ssl.losses.WMSELoss`. Use a small projection_dim
    (the paper: 32-64) below the loss's ``w_size``.

    forward: V views -> ``{"z": [z_1 .. z_V]}``, each (B, projection_dim).
    """

    n_layers = 2

    def __init__(self, encoder: nn.Module, projection_dim: int = 64, hidden_dim: int = 512):
        super().__init__(encoder, projection_dim, hidden_dim)
