"""Losses of the joint-embedding methods in :mod:`medsim.ssl.methods`.

Each is called as MONAI's ``loss_function(pred, target)``: ``pred`` is the method's forward dict, ``target`` a dict
(possibly holding ``"label"`` / ``"index"``), a tensor or ``None`` — every loss here is label-free and ignores it.
Returns a scalar. Multi-view (V > 2) inputs are averaged over the view pairs (ordered pairs for the asymmetric
predictor losses, unordered for the symmetric ones).

InfoNCE (SimCLR, MoCo v2) and VICReg come from pytorch-metric-learning (``NTXentLoss``, ``SelfSupervisedLoss``,
``VICRegLoss``); BYOL, SimSiam, Barlow Twins and W-MSE are written here, each tested against its paper's formula.

False-negative elimination (Huynh et al., WACV 2022, "Boosting contrastive self-supervised learning with false
negative cancellation"; the review's Fig. 10): for an anchor i a *support set* S_i of other views of the same
image scores every negative n by ``agg_{s in S_i} cos(s, n)`` (agg = max or mean); the negatives with the top-k
scores (``fnc_k``), optionally only those above ``fnc_threshold``, form F_i and are removed from the anchor's
denominator: ``-log exp(s_ip/τ) / (exp(s_ip/τ) + sum_{n not in F_i, n != p} exp(s_in/τ))``. Detection is done
without gradients. Support sets here: SimCLR — the anchor image's other V-1 views (with V = 2 that is the positive
view only; extra multi-crop views enlarge it); MoCo v2 — the key view plus the momentum-encoded views[2:].
The paper's other variant (attraction: F_i joins the positives) is not implemented.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

__all__ = ["SSLLoss", "NTXentLoss", "MoCoLoss", "BYOLLoss", "SimSiamLoss", "BarlowTwinsLoss", "VICRegLoss",
           "WMSELoss", "byol_regression", "target_tensors", "false_negative_mask", "barlow_twins_loss", "whiten",
           "FNC_MODES"]

FNC_MODES = ("elimination",)
AGGREGATIONS = ("max", "mean")


class SSLLoss(nn.Module):
    """Base: checks that ``required_outputs`` are in ``pred`` and that list outputs hold >= 2 views, then calls
    :meth:`compute_loss` (``target`` is accepted and ignored)."""

    takes_outputs = True
    required_outputs: tuple[str, ...] = ()

    def forward(self, pred: Mapping[str, Any], target: Mapping[str, Any] | torch.Tensor | None = None
                ) -> torch.Tensor:
        missing = [k for k in self.required_outputs if k not in pred]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the method outputs {list(self.required_outputs)}; "
                             f"missing {missing} (got keys {sorted(pred)})")
        for key in self.required_outputs:
            if isinstance(pred[key], (list, tuple)) and len(pred[key]) < 2:
                raise ValueError(f"{type(self).__name__}: '{key}' must hold V >= 2 views, got {len(pred[key])}")
        return self.compute_loss(pred)

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError


def target_tensors(target: Any, keys: Sequence[str], owner: str, what: str, source: str) -> list[torch.Tensor]:
    """The tensors ``target[k]`` for ``keys`` of a loss that reads more than labels from the batch's target (e.g. the
    point correspondences of paired 3-D crops).

    Raises:
        ValueError: ``target`` is not a mapping holding every key; the message names ``owner`` (the loss),
            ``what`` it reads and the ``source`` that provides it.
    """
    if not isinstance(target, Mapping) or any(k not in target for k in keys):
        got = sorted(target) if isinstance(target, Mapping) else type(target).__name__
        raise ValueError(f"{owner} reads {what} {list(keys)} from the target ({source}), got {got}")
    return [torch.as_tensor(target[k]) for k in keys]


def _check_fnc(fnc: str | None, k: int | None, threshold: float | None, aggregate: str) -> None:
    if fnc is not None:
        look_up_option(fnc, FNC_MODES)
        if k is None and threshold is None:
            raise ValueError("fnc='elimination' needs fnc_k (top-k per anchor) or fnc_threshold, got neither")
        if k is not None and k < 1:
            raise ValueError(f"fnc_k must be >= 1, got fnc_k={k}")
    look_up_option(aggregate, AGGREGATIONS)


@torch.no_grad()
def false_negative_mask(support: torch.Tensor, candidates: torch.Tensor, negative: torch.Tensor, *,
                        k: int | None = 1, threshold: float | None = None, aggregate: str = "max") -> torch.Tensor:
    """The false negatives F_i of each anchor (Huynh et al. 2022, support-set detection).

    Args:
        support: (A, S, P) the S support views of each of the A anchors.
        candidates: (M, P) the samples the anchors are contrasted with.
        negative: (A, M) bool, which candidates are negatives of each anchor (only they can be eliminated).
        k: keep at most the k highest-scoring negatives per anchor (``None``: no top-k limit).
        threshold: keep only negatives whose score exceeds it (``None``: no threshold).
        aggregate: ``"max"`` or ``"mean"`` of the cosine similarities over the support views.

    Returns:
        (A, M) bool, True where candidate m is a detected false negative of anchor a.
    """
    sims = torch.einsum("asp,mp->asm", F.normalize(support, dim=-1), F.normalize(candidates, dim=-1))
    scores = sims.amax(1) if look_up_option(aggregate, AGGREGATIONS) == "max" else sims.mean(1)
    scores = scores.masked_fill(~negative, float("-inf"))
    chosen = negative.clone()
    if k is not None:
        top = torch.zeros_like(negative)
        top.scatter_(1, scores.topk(min(k, scores.shape[1]), dim=1).indices, True)
        chosen &= top
    if threshold is not None:
        chosen &= scores > threshold
    return chosen


class NTXentLoss(SSLLoss):
    """SimCLR's NT-Xent (Chen et al. 2020) over the V·B projected views, PML's ``NTXentLoss`` (cosine similarity,
    temperature τ): each positive pair (a, p) gives ``-log exp(s_ap/τ) / (exp(s_ap/τ) + sum_n exp(s_an/τ))`` over
    the negatives n of a (the other images' views), averaged over all positive pairs. With V = 2 this is the
    paper's loss over 2N anchors (PML's ``SelfSupervisedLoss`` wrapper).

    Args:
        temperature: τ.
        fnc: ``None`` (off) or ``"elimination"`` (false negatives leave the denominator; module docstring).
        fnc_k, fnc_threshold, fnc_aggregate: the detection rule (:func:`false_negative_mask`).

    pred: ``{"z": [z_1 .. z_V]}``, each (B, P).
    """

    required_outputs = ("z",)

    def __init__(self, temperature: float = 0.5, fnc: str | None = None, fnc_k: int | None = 1,
                 fnc_threshold: float | None = None, fnc_aggregate: str = "max"):
        super().__init__()
        _check_fnc(fnc, fnc_k, fnc_threshold, fnc_aggregate)
        self.ntxent = pml.NTXentLoss(temperature=temperature)
        self.pair_loss = pml.SelfSupervisedLoss(self.ntxent, symmetric=True)
        self.fnc, self.fnc_k, self.fnc_threshold, self.fnc_aggregate = fnc, fnc_k, fnc_threshold, fnc_aggregate

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        z: Sequence[torch.Tensor] = pred["z"]
        if len(z) == 2 and self.fnc is None:
            return self.pair_loss(z[0], z[1])
        v, b = len(z), z[0].shape[0]
        emb = torch.cat(list(z))
        labels = torch.arange(b, device=emb.device).repeat(v)
        if self.fnc is None:
            return self.ntxent(emb, labels)
        a1, p, a2, n = lmu.get_all_pairs_indices(labels)
        stacked = torch.stack(list(z)).detach()  # (V, B, P)
        view = torch.arange(v * b, device=emb.device) // b
        others = torch.stack([torch.tensor([u for u in range(v) if u != w]) for w in range(v)]).to(emb.device)
        support = stacked[others[view], labels[:, None]]  # (V·B, V-1, P): the anchor image's other views
        negative = labels[:, None] != labels[None, :]
        eliminated = false_negative_mask(support, emb.detach(), negative, k=self.fnc_k,
                                         threshold=self.fnc_threshold, aggregate=self.fnc_aggregate)
        keep = ~eliminated[a2, n]
        return self.ntxent(emb, labels, indices_tuple=(a1, p, a2[keep], n[keep]))


class MoCoLoss(SSLLoss):
    """MoCo's InfoNCE against the queue (He et al. 2020): ``-log exp(q·k+/τ) / (exp(q·k+/τ) + sum_j exp(q·queue_j/τ))``
    averaged over the batch — the in-batch keys of other images are *not* negatives, as in MoCo. Computed with
    PML's ``NTXentLoss`` on (q, [k; queue]) with explicit pairs.

    Args:
        temperature: τ (0.2 in MoCo v2).
        fnc, fnc_k, fnc_threshold, fnc_aggregate: false-negative elimination over the queue, support set = the
            key view and ``pred["support"]`` (module docstring).

    pred: ``{"q": (B, P), "k": (B, P), "queue": (K, P)[, "support": [(B, P), ...]]}``.
    """

    required_outputs = ("q", "k", "queue")

    def __init__(self, temperature: float = 0.2, fnc: str | None = None, fnc_k: int | None = 1,
                 fnc_threshold: float | None = None, fnc_aggregate: str = "max"):
        super().__init__()
        _check_fnc(fnc, fnc_k, fnc_threshold, fnc_aggregate)
        self.ntxent = pml.NTXentLoss(temperature=temperature)
        self.fnc, self.fnc_k, self.fnc_threshold, self.fnc_aggregate = fnc, fnc_k, fnc_threshold, fnc_aggregate

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        q, k, queue = pred["q"], pred["k"].detach(), pred["queue"].detach()
        b, m = q.shape[0], queue.shape[0]
        rows = torch.arange(b, device=q.device)
        negative = torch.ones(b, m, dtype=torch.bool, device=q.device)
        if self.fnc is not None:
            support = torch.stack([k, *[s.detach() for s in pred.get("support", [])]], dim=1)  # (B, S, P)
            negative &= ~false_negative_mask(support, queue, negative, k=self.fnc_k, threshold=self.fnc_threshold,
                                             aggregate=self.fnc_aggregate)
        a2, n = torch.nonzero(negative, as_tuple=True)
        return self.ntxent(q, indices_tuple=(rows, rows, a2, n + b), ref_emb=torch.cat([k, queue]))


def _negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -cos(p_b, z_b); p, z (B, P)."""
    return -F.cosine_similarity(p, z, dim=1).mean()


def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression term ``mean_b ||p̄_b - z̄'_b||² = 2 - 2 mean_b cos(p_b, z'_b)`` (Grill et al. 2020, Eq. 2)
    of online predictions p and target projections z (B, P); z is detached (the target gets no gradient)."""
    return 2 + 2 * _negative_cosine(p, z.detach())


class BYOLLoss(SSLLoss):
    """BYOL (Grill et al. 2020): ``||p̄ - z̄'||² = 2 - 2 cos(p, z')`` of the online prediction and the target
    projection of the other view, symmetrised: L + L̃ for V = 2 (the paper's total); for V views
    ``2 / (V (V-1)) · sum_{i != j}`` of the batch means.

    pred: ``{"p": [p_1 .. p_V], "z_target": [z'_1 .. z'_V]}``, each (B, P); z' is detached here too.
    """

    required_outputs = ("p", "z_target")

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        p, z = pred["p"], pred["z_target"]
        pairs = list(itertools.permutations(range(len(p)), 2))
        return 2 * sum(byol_regression(p[i], z[j]) for i, j in pairs) / len(pairs)


class SimSiamLoss(SSLLoss):
    """SimSiam (Chen & He 2021): ``½ D(p1, stopgrad(z2)) + ½ D(p2, stopgrad(z1))`` with D the negative cosine;
    for V views the mean over ordered pairs i != j.

    Args:
        stop_gradient: detach z (the paper). ``False`` is the collapsing ablation of the paper's Fig. 2.

    pred: ``{"p": [p_1 .. p_V], "z": [z_1 .. z_V]}``, each (B, P).
    """

    required_outputs = ("p", "z")

    def __init__(self, stop_gradient: bool = True):
        super().__init__()
        self.stop_gradient = stop_gradient

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        p, z = pred["p"], pred["z"]
        pairs = list(itertools.permutations(range(len(p)), 2))
        return sum(_negative_cosine(p[i], z[j].detach() if self.stop_gradient else z[j]) for i, j in pairs
                   ) / len(pairs)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5
                      ) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, Eq. 1-2): z (B, P) standardised along the batch (biased std, as BN),
    ``C = z̃1ᵀ z̃2 / B`` (P, P), loss ``sum_i (1 - C_ii)² + λ sum_{i != j} C_ij²``.

    (The review says the invariance term pushes the *off*-diagonal towards 1; the paper's invariance term is on the
    diagonal, as written here.)
    """
    n1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + eps)
    n2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + eps)
    c = n1.T @ n2 / z1.shape[0]
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


class BarlowTwinsLoss(SSLLoss):
    """:func:`barlow_twins_loss` (λ = 5e-3), averaged over the unordered view pairs.

    pred: ``{"z": [z_1 .. z_V]}``, each (B, P) with B > 1.
    """

    required_outputs = ("z",)

    def __init__(self, lambd: float = 5e-3):
        super().__init__()
        self.lambd = lambd

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        pairs = list(itertools.combinations(pred["z"], 2))
        return sum(barlow_twins_loss(a, b, self.lambd) for a, b in pairs) / len(pairs)


class VICRegLoss(SSLLoss):
    """VICReg (Bardes et al. 2022) with PML's ``VICRegLoss``: ``λ s(Z, Z') + μ [v(Z) + v(Z')] / 2 + ν [c(Z) + c(Z')]``
    with s the MSE, v the hinge ``mean_d relu(1 - sqrt(Var(z_d) + ε))``, c the squared off-diagonal covariance / P
    (λ = μ = 25, ν = 1; the ½ on the variance is the official code's). Averaged over unordered view pairs.

    pred: ``{"z": [z_1 .. z_V]}``, each (B, P).
    """

    required_outputs = ("z",)

    def __init__(self, invariance_lambda: float = 25.0, variance_mu: float = 25.0, covariance_v: float = 1.0,
                 eps: float = 1e-4):
        super().__init__()
        self.vicreg = pml.VICRegLoss(invariance_lambda=invariance_lambda, variance_mu=variance_mu,
                                     covariance_v=covariance_v, eps=eps)

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        pairs = list(itertools.combinations(pred["z"], 2))
        return sum(self.vicreg(a, ref_emb=b) for a, b in pairs) / len(pairs)


def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """W-MSE's whitening (Ermolov et al. 2021, Eq. 4-5): ``(x - μ) Wᵀ`` with ``W = L⁻¹``, L the Cholesky factor of
    the (shrunk) covariance ``(1 - eps) Σ + eps I``, ``Σ = (x - μ)ᵀ(x - μ) / (N - 1)``; the output has zero mean
    and identity covariance (for eps = 0). x (N, P) with N > P."""
    n, p = x.shape
    if n <= p:
        raise ValueError(f"whitening needs more samples than dimensions, got {n} samples of dimension {p} "
                         f"(raise w_size above the projection_dim)")
    centred = x - x.mean(0)
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    cov = (1 - eps) * centred.T @ centred / (n - 1) + eps * eye
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)
    return centred @ w.T


class WMSELoss(SSLLoss):
    """W-MSE (Ermolov et al. 2021): per view, random groups of ``w_size`` samples are whitened (:func:`whiten`),
    then the positives are compared by the MSE of their L2-normalised whitened vectors,
    ``2 - 2 cos(w_i, w_j)``, averaged over the batch, the unordered view pairs and ``w_iter`` random groupings.

    pred: ``{"z": [z_1 .. z_V]}``, each (B, P), B a multiple of w_size and w_size > P.
    """

    required_outputs = ("z",)

    def __init__(self, w_size: int = 128, w_iter: int = 1, eps: float = 0.0):
        super().__init__()
        self.w_size, self.w_iter, self.eps = w_size, w_iter, eps

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        z: Sequence[torch.Tensor] = pred["z"]
        b = z[0].shape[0]
        if b % self.w_size:
            raise ValueError(f"W-MSE whitens groups of w_size={self.w_size} samples; the batch size B={b} must be a "
                             f"multiple of it (change the batch size or w_size)")
        pairs = list(itertools.combinations(range(len(z)), 2))
        total = z[0].new_zeros(())
        for _ in range(self.w_iter):
            groups = torch.randperm(b, device=z[0].device).view(-1, self.w_size)
            white = [torch.empty_like(zv) for zv in z]
            for idx in groups:
                for wv, zv in zip(white, z):
                    wv[idx] = whiten(zv[idx], self.eps)
            for i, j in pairs:
                total = total + 2 + 2 * _negative_cosine(white[i], white[j])
        return total / (self.w_iter * len(pairs))
