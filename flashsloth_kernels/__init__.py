"""Fused kernels for FlashSloth's embedded visual compression.

Public API:
  spatial_attention_pool / SpatialAttentionPool   (SAP, flashsloth_kernels.sap)
  BackendUnavailableError                        (an explicitly named backend cannot run)
  available_backends(op)                         (why each backend can or cannot run here)
"""

from ._dispatch import BackendUnavailableError, available_backends
from .sap import SpatialAttentionPool, spatial_attention_pool

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "SpatialAttentionPool",
    "spatial_attention_pool",
]
