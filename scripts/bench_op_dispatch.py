"""What the eager bypass of the registered ops saves (flashsloth_kernels/_op.py, "Eager bypass").

Times each public function on the cpu backend twice per iteration, interleaved: once as users
call it (an unobserved inference call takes the bypass) and once forced through the registered
``torch.library`` op (flashsloth_kernels._compat.FORCE_FALLBACK, the path every call takes when
the private torch APIs are missing). Prints the medians and the op's dispatch overhead.

    python scripts/bench_op_dispatch.py [--threads 1]
"""

import argparse
import statistics
import time

import torch

import flashsloth_kernels as fk
from flashsloth_kernels import _compat


def bench(f, n):
    bypass, op = [], []
    try:
        for _ in range(n):
            _compat.FORCE_FALLBACK = False
            t = time.perf_counter()
            f()
            bypass.append(time.perf_counter() - t)
            _compat.FORCE_FALLBACK = True
            t = time.perf_counter()
            f()
            op.append(time.perf_counter() - t)
    finally:
        _compat.FORCE_FALLBACK = False
    return statistics.median(bypass) * 1e6, statistics.median(op) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 32, 9, 18), torch.randn(1, 32, 729, 18), torch.randn(1, 32, 729, 36)
    xs, w1s, b1s, w2s = torch.randn(1, 49, 64), torch.randn(64, 64), torch.randn(64), \
        torch.randn(1, 64)
    cases = [
        ("query_patch_attention B=1 EmbQ (9 x 729, 32 heads)", 1000,
         lambda: fk.query_patch_attention(q, k, v, backend="cpu")),
        ("spatial_attention_pool B=1 7x7x64", 2000,
         lambda: fk.spatial_attention_pool(xs, w1s, b1s, w2s, None, backend="cpu")),
    ]
    with torch.no_grad():
        for name, n, f in cases:
            for _ in range(20):
                f()
            by, op = bench(f, n)
            print(f"{name}: bypass {by:.1f} us, through the op {op:.1f} us, "
                  f"dispatch overhead {op - by:.1f} us ({(op - by) / by * 100:.0f}%)")


if __name__ == "__main__":
    main()
