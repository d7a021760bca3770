"""medsim.ssl: joint-embedding self-supervised methods on the Embedder contract (the review of SSL joint-embedding
architectures: SimCLR, MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg, W-MSE) and their losses, and SAM's pixel-wise
anatomical embeddings in 3-D (Yan et al. TMI 2022; :mod:`medsim.ssl.sam`: its loss also reads the point pairs in the
target) and PGL, BYOL with a local consistency loss between the same regions of two 3-D crops (Xie et al. 2020;
:mod:`medsim.ssl.pgl`).

A method wraps an encoder (:class:`medsim.nn.Embedder`); ``method(views)`` returns the dict its loss reads,
``loss(pred, target)`` the scalar. :data:`METHODS` maps a name to (method class, loss class)::

    method_cls, loss_cls = get_method("byol")
    model, loss = method_cls(Embedder(...)), loss_cls()
    opt = torch.optim.Adam(model.trainable_parameters())   # momentum/target branches excluded
    loss(model([view1, view2]), {}).backward()
    model.encoder.state_dict()                              # what a downstream run loads
"""

from __future__ import annotations

from monai.utils import look_up_option

from medsim.ssl.losses import (BarlowTwinsLoss, BYOLLoss, MoCoLoss, NTXentLoss, SimSiamLoss, SSLLoss, VICRegLoss,
                               WMSELoss, barlow_twins_loss, false_negative_mask, whiten)
from medsim.ssl.methods import (BYOL, WMSE, BarlowTwins, JointEmbedding, MoCoV2, SimCLR, SimSiam, VICReg,
                                ema_update, projection_head)
from medsim.ssl.pgl import PGL, PGLLoss
from medsim.ssl.sam import SAM, SAMLoss, info_nce_logits, match_points, sample_points

__all__ = ["METHODS", "DENSE_METHODS", "get_method", "JointEmbedding", "SimCLR", "MoCoV2", "BYOL", "SimSiam", "BarlowTwins", "VICReg",
           "WMSE", "projection_head", "ema_update", "SSLLoss", "NTXentLoss", "MoCoLoss", "BYOLLoss", "SimSiamLoss",
           "BarlowTwinsLoss", "VICRegLoss", "WMSELoss", "barlow_twins_loss", "false_negative_mask", "whiten", "SAM",
           "SAMLoss", "info_nce_logits", "match_points", "sample_points", "PGL", "PGLLoss"]

#: name -> (method class, loss class)
METHODS: dict[str, tuple[type[JointEmbedding], type[SSLLoss]]] = {
    "simclr": (SimCLR, NTXentLoss),
    "moco_v2": (MoCoV2, MoCoLoss),
    "byol": (BYOL, BYOLLoss),
    "simsiam": (SimSiam, SimSiamLoss),
    "barlow_twins": (BarlowTwins, BarlowTwinsLoss),
    "vicreg": (VICReg, VICRegLoss),
    "wmse": (WMSE, WMSELoss),
}
#: dense / correspondence methods: their loss reads the crops' point correspondence from the batch's target (paired
#: 3-D crops, medsim.data.views3d); SAM's encoder gives maps, not one vector (medsim.nn.SAMNet), and takes no projector
#: arguments; PGL is BYOL on a medsim.nn.Embedder with dense features
DENSE_METHODS: dict[str, tuple[type[JointEmbedding], type[SSLLoss]]] = {"sam": (SAM, SAMLoss), "pgl": (PGL, PGLLoss)}


def get_method(name: str) -> tuple[type[JointEmbedding], type[SSLLoss]]:
    """(method class, loss class) registered under ``name`` (:data:`METHODS` or :data:`DENSE_METHODS`); an unknown
    name raises ValueError with "did you mean" suggestions (MONAI's ``look_up_option``)."""
    return look_up_option(name, {**METHODS, **DENSE_METHODS})
