"""Attention geometry: moved to :mod:`medsim.runtime.geometry` (shared by the model and deployment layers);
re-exported here so ``from medsim.deploy.geometry import AttentionGeometry`` keeps working."""

from medsim.runtime.geometry import (AttentionGeometry, AxisGeometry, geometry_from_manifest, interp_matrix,
                                     resample_attention)

__all__ = ["AxisGeometry", "AttentionGeometry", "interp_matrix", "resample_attention", "geometry_from_manifest"]
