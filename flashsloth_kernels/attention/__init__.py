"""Query-to-patch attention (FlashSloth's EmbQ): reference.py (the math), fused_cpu.py
(+ csrc/attention), fused_triton.py, op.py (registration + public function), module.py
(EmbeddedQuery)."""

from .module import EmbeddedQuery
from .op import query_patch_attention
from .reference import query_patch_attention_reference

__all__ = ["EmbeddedQuery", "query_patch_attention", "query_patch_attention_reference"]
