"""medsim.nn: backbones (MONAI nets), attention modules and the one Embedder contract every model follows.

Models (each returns ``{"embedding", "attention"[, "logits"], ...}``):

- :class:`Embedder` — DSL / MML / single-learner baselines (Adiga Vasudeva et al., MIDL 2022)
- :class:`ABEEmbedder` — attention-based ensemble ABE-M (Kim et al., ECCV 2018)
- :class:`FineGrainedMIL` — gated-attention fine-grained multi-instance classifier (Fan et al.)
- :class:`LossAttentionNet` — loss-based attention and MIL poolings (Shi et al.; Ilse et al. 2018)
"""

from medsim.nn.abe import ABEEmbedder
from medsim.nn.attention import ATTENTIONS, DSLAttention, NoAttention, create_attention
from medsim.nn.backbones import make_backbone
from medsim.nn.embedder import Embedder, upsample_attention
from medsim.nn.gated_attention import FineGrainedMIL, GatedAttention, create_fine_grained_attention
from medsim.nn.loss_attention import LossAttentionNet, create_pooling

__all__ = ["ATTENTIONS", "DSLAttention", "NoAttention", "create_attention", "make_backbone", "Embedder",
           "upsample_attention", "ABEEmbedder", "FineGrainedMIL", "GatedAttention", "create_fine_grained_attention",
           "LossAttentionNet", "create_pooling"]
