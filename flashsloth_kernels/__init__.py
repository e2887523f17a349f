"""Fused kernels for FlashSloth's embedded visual compression.

Public API:
  spatial_attention_pool / SpatialAttentionPool   (SAP, flashsloth_kernels.sap)
  BackendUnavailableError                        (an explicitly named backend cannot run)
  available_backends(op)                         (what each backend says about this machine)
"""

from ._dispatch import BackendUnavailableError
from .sap import SpatialAttentionPool, spatial_attention_pool

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "SpatialAttentionPool",
    "spatial_attention_pool",
]
