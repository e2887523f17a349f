"""flashsloth-kernels benchmark suite (python -m benchmarks / flashsloth-bench)."""
