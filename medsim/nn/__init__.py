"""medsim.nn: backbones (MONAI nets), attention modules and the one Embedder contract every model follows."""

from medsim.nn.attention import ATTENTIONS, DSLAttention, NoAttention, create_attention
from medsim.nn.backbones import make_backbone
from medsim.nn.embedder import Embedder, upsample_attention

__all__ = ["ATTENTIONS", "DSLAttention", "NoAttention", "create_attention", "make_backbone", "Embedder",
           "upsample_attention"]
