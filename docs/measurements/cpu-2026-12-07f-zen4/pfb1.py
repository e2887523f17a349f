"""B = 1 with software prefetch forced on (set_prefetch_min_bytes(0)) against the default
(off: K and V fit in the cache), each sample of 10 public calls right after eager and SDPA
samples, as in the benchmark. python pfb1.py [LQ]
"""
import statistics as st, sys, time, torch
import torch.nn.functional as F
torch.set_num_threads(2)
import flashsloth_kernels.attention.fused_cpu as fc
from flashsloth_kernels.attention import query_patch_attention as qpa
Lq = int(sys.argv[1]) if len(sys.argv) > 1 else 9
torch.manual_seed(0)
q, k, v = (torch.randn(1, 32, n, d) for n, d in ((Lq, 18), (729, 18), (729, 36)))
sc = 18 ** -0.5
def eager():
    s = (q @ k.transpose(-1, -2)) * sc
    return torch.softmax(s, -1) @ v
sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=sc)
fused = lambda: qpa(q, k, v, scale=sc)
def sample(f, n=10):
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e3
res = {"off": [], "on": [], "eager": []}
for r in range(30):
    for m in (("off", "on") if r % 2 else ("on", "off")):
        fc.set_prefetch_min_bytes(0 if m == "on" else None)
        res["eager"].append(sample(eager)); sample(sdpa)
        res[m].append(sample(fused))
for m, x in res.items(): print(m, f"{st.median(x):.4f}")
print("eager/off %.3f eager/on %.3f" % (st.median(res["eager"]) / st.median(res["off"]), st.median(res["eager"]) / st.median(res["on"])))
