import time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
import sys
torch.set_num_threads(int(sys.argv[1]))
res = {}
cases = [(1, 1, 1), (1, 32, 1), (1, 32, 8), (1, 32, 64), (1, 32, 729)]
data = {c: (torch.randn(c[0], c[1], 9, 18), torch.randn(c[0], c[1], c[2], 18), torch.randn(c[0], c[1], c[2], 36)) for c in cases}
for r in range(7):
    for c, (q, k, v) in data.items():
        n = 2000 if c[2] < 100 else 200
        for _ in range(20): fc.attn_fwd(q, k, v, None, 0.2)
        t = time.perf_counter()
        for _ in range(n): fc.attn_fwd(q, k, v, None, 0.2)
        res.setdefault(c, []).append((time.perf_counter() - t) / n * 1e6)
for c, x in res.items(): print(c, f"{st.median(x):.2f} us")
