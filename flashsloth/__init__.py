"""The slim FlashSloth reference model built on flashsloth_kernels' fused ops."""
