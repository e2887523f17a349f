"""B = 1 against B = 16 at 1 and 2 threads in one process (10 interleaved rounds): cycles a
key and head per core, the default prefetch policy. python pen.py
"""
import statistics as st, sys, time, torch
import flashsloth_kernels.attention.fused_cpu as fc
torch.manual_seed(0)
sc = 18 ** -0.5
data = {B: [torch.randn(B, 32, n, d) for n, d in ((9, 18), (729, 18), (729, 36))] for B in (1, 16)}
res = {}
for r in range(10):
    for th in (1, 2):
        torch.set_num_threads(th)
        for B in (1, 16):
            q, k, v = data[B]
            reps = max(1, int(0.02 / (0.00032 * B / th)))
            fc.attn_fwd(q, k, v, None, sc); t = time.perf_counter()
            for _ in range(reps): fc.attn_fwd(q, k, v, None, sc)
            res.setdefault((th, B), []).append((time.perf_counter() - t) / reps)
for (th, B), x in res.items():
    m = st.median(x); print(f"threads={th} B={B}: {m*1e3:.3f} ms  {m*3.66e9*th/(B*32*729):.1f} cycles/key-head/core")
