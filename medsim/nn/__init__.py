"""medsim.nn: backbones (MONAI nets), attention modules and the one Embedder contract every model follows.

Every model derives from :class:`EmbedderBase` (one input check, a named ``trunk``, ``embedding_dim``,
``attention_geometry(input_size)``) and returns an :class:`EmbedderOutput` ``{"embedding", "attention"[, "logits"],
["features"], ...}``; every attention module is built by :func:`create_attention` from the one registry
:data:`ATTENTIONS`. Models:

- :class:`Embedder` — DSL / MML / single-learner baselines (Adiga Vasudeva et al., MIDL 2022)
- :class:`ABEEmbedder` — attention-based ensemble ABE-M (Kim et al., ECCV 2018)
- :class:`FineGrainedMIL` — gated-attention fine-grained multi-instance classifier (Fan et al.)
- :class:`LossAttentionNet` — loss-based attention and MIL poolings (Shi et al.; Ilse et al. 2018)
- :class:`SAMNet` — global + local pixel-wise anatomical embeddings in 3-D (SAM, Yan et al. TMI 2022)

Training helpers: :func:`freeze_batchnorm` (:class:`FrozenBatchNorm`, for a pretrained trunk fine-tuned with small
batches) and :func:`param_groups` (DSL's small trunk + attention learning rate, larger head learning rate).
"""

from medsim.nn.abe import ABEEmbedder
from medsim.nn.attention import ATTENTION_ALIASES, ATTENTIONS, DSLAttention, NoAttention, create_attention
from medsim.nn.backbones import make_backbone
from medsim.nn.base import EmbedderBase, EmbedderOutput
from medsim.nn.embedder import Embedder, upsample_attention
from medsim.nn.fine_grained_attention import GatedAttention
from medsim.nn.fine_grained_mil import FineGrainedMIL
from medsim.nn.frozen_batchnorm import FrozenBatchNorm, freeze_batchnorm
from medsim.nn.gated_attention import create_fine_grained_attention
from medsim.nn.loss_attention import LossAttentionNet
from medsim.nn.mil_attention import MILAttention, MILGatedAttention
from medsim.nn.param_groups import param_groups
from medsim.nn.sam import SAMNet

__all__ = ["EmbedderBase", "EmbedderOutput", "ATTENTIONS", "ATTENTION_ALIASES", "DSLAttention", "NoAttention",
           "create_attention", "make_backbone", "Embedder", "upsample_attention", "ABEEmbedder", "FineGrainedMIL",
           "GatedAttention", "create_fine_grained_attention", "LossAttentionNet", "MILAttention", "MILGatedAttention",
           "FrozenBatchNorm", "freeze_batchnorm", "param_groups", "SAMNet"]
