"""Spatial attention pooling (SAP): reference.py (the math), fused_cpu.py, fused_triton.py,
op.py (registration + public function), module.py (nn.Module)."""

from .module import SpatialAttentionPool
from .op import spatial_attention_pool
from .reference import sap_reference

__all__ = ["SpatialAttentionPool", "spatial_attention_pool", "sap_reference"]
