# ns per key and head of the fused forward at Lq = 9, 1 thread: K / V in L2 (H = 4) vs L3 (H = 32) vs DRAM (B = 16)
import sys, time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(1)
cases = [(1, 4), (1, 8), (1, 32), (4, 32), (16, 32)]
data = {}
for B, H in cases:
    q = torch.randn(B, H, 9, 18); k = torch.randn(B, H, 729, 18); v = torch.randn(B, H, 729, 36)
    data[(B, H)] = (q, k, v)
res = {c: [] for c in cases}
for r in range(10):
    for c in cases:
        q, k, v = data[c]
        n = max(1, int(2e5 / (c[0] * c[1] * 729)))
        fc.attn_fwd(q, k, v, None, 0.2)
        t = time.perf_counter()
        for _ in range(n): fc.attn_fwd(q, k, v, None, 0.2)
        res[c].append((time.perf_counter() - t) / n / (c[0] * c[1] * 729) * 1e9)
for c, xs in res.items():
    print(f"B={c[0]} H={c[1]} K+V={c[0]*c[1]*729*54*4/1e6:.1f} MB: {st.median(xs):.2f} ns/key/head ({min(xs):.2f}) prefetch={'on' if c[0]*c[1]*729*54*4 > fc.prefetch_min_bytes() else 'off'}")
