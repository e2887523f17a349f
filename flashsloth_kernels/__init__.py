"""Fused kernels for FlashSloth's embedded visual compression.

Public API:
  spatial_attention_pool / SpatialAttentionPool   (SAP, flashsloth_kernels.sap)
  query_patch_attention / EmbeddedQuery           (EmbQ, flashsloth_kernels.attention)
  BackendUnavailableError                        (an explicitly named backend cannot run)
  available_backends(op)                         (why each backend can or cannot run here)
"""

from ._dispatch import BackendUnavailableError, available_backends
from .attention import EmbeddedQuery, query_patch_attention
from .sap import SpatialAttentionPool, spatial_attention_pool

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "EmbeddedQuery",
    "available_backends",
    "query_patch_attention",
    "SpatialAttentionPool",
    "spatial_attention_pool",
]
