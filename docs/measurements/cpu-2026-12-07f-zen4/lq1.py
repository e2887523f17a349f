"""B = 16, Lq = 1 (or LQ): the fused forward with and without software prefetch, eager and a
128 MB read, interleaved in one process. python lq1.py THREADS [LQ]
"""
import statistics as st, sys, time, torch
import flashsloth_kernels.attention.fused_cpu as fc
th = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(th)
Lq = int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.manual_seed(0)
B = 16
q, k, v = (torch.randn(B, 32, n, d) for n, d in ((Lq, 18), (729, 18), (729, 36)))
sc = 18 ** -0.5
big = torch.empty(128 << 20 >> 2).uniform_()
def eager():
    s = (q @ k.transpose(-1, -2)) * sc
    return torch.softmax(s, -1) @ v
cases = {"fused": lambda: fc.attn_fwd(q, k, v, None, sc),
         "fused-pf-off": lambda: (fc.set_prefetch_min_bytes(1 << 40), fc.attn_fwd(q, k, v, None, sc), fc.set_prefetch_min_bytes(None)),
         "eager": eager, "read128MB": lambda: big.sum()}
res = {c: [] for c in cases}
for r in range(14):
    for c, f in (cases.items() if r % 2 else reversed(list(cases.items()))):
        f(); t = time.perf_counter()
        for _ in range(4): f()
        res[c].append((time.perf_counter() - t) / 4 * 1e3)
nb = (q.numel() + k.numel() + v.numel() + B * 32 * Lq * 36) * 4 / 1e9
for c, x in res.items():
    m = st.median(x); gb = (128 * 1.048576 / 1e3 if c.startswith("read") else nb) / (m / 1e3)
    print(f"threads={th} Lq={Lq} {c}: {m:.3f} ms {gb:.1f} GB/s")
