"""Per-call time (us) of the i-th of 10 back-to-back B = 1 calls right after eager and SDPA
calls, as in the benchmark's interleaved rounds: the public function and the kernel op.
"""
import statistics as st, sys, time, torch
import torch.nn.functional as F
torch.set_num_threads(2)
from flashsloth_kernels.attention import query_patch_attention as qpa
kop = torch.ops.flashsloth.query_patch_attention_fwd
torch.manual_seed(0)
q, k, v = (torch.randn(1, 32, n, d) for n, d in ((9, 18), (729, 18), (729, 36)))
sc = 18 ** -0.5
def eager():
    s = (q @ k.transpose(-1, -2)) * sc
    return torch.softmax(s, -1) @ v
sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=sc)
for name, fused in (("public", lambda: qpa(q, k, v, scale=sc)), ("kernel_op", lambda: kop(q, k, v, None, sc))):
    per = [[] for _ in range(10)]
    for r in range(40):
        for _ in range(10): eager()
        for _ in range(3): sdpa()
        for i in range(10):
            t = time.perf_counter(); fused(); per[i].append((time.perf_counter() - t) * 1e6)
    print(name, " ".join(f"{st.median(x):.0f}" for x in per))
