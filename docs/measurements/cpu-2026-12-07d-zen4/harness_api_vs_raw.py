import sys, time, torch, statistics as st
sys.path.insert(0, ".")  # run from the repository root
import flashsloth_kernels as fk
import flashsloth_kernels.attention.fused_cpu as fc
import torch.nn.functional as F
from benchmarks.timing import time_providers, Budget
torch.set_num_threads(2)
B=1; Lq=9
torch.manual_seed(0)
q = torch.randn(B, 32, Lq, 18); k = torch.randn(B, 32, 729, 18); v = torch.randn(B, 32, 729, 36)
sc = 18 ** -0.5
def eager():
    s = (q @ k.transpose(-1, -2)) * sc
    return s.softmax(-1) @ v
fns = {"fused": lambda: fk.query_patch_attention(q, k, v, scale=sc), "raw": lambda: fc.attn_fwd(q, k, v, None, sc),
       "eager": eager, "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=sc)}
if len(sys.argv) > 1: fns = {n: f for n, f in fns.items() if n in sys.argv[1].split(",")}
for rep in range(3):
    t, e = time_providers(fns, torch.device("cpu"), Budget(min_rounds=5, max_rounds=15, seconds=3.0))
    print("  ".join(f"{n}={x.median_ms:.4f}(inner {x.inner})" for n, x in t.items()), f"ratio eager/fused {t['eager'].median_ms/t['fused'].median_ms:.2f}" if 'eager' in t else "")
import gc, collections
stats = collections.defaultdict(list); t0 = [0]
def cb(phase, info):
    if phase == "start": t0[0] = time.perf_counter()
    else: stats[info["generation"]].append(time.perf_counter() - t0[0])
gc.callbacks.append(cb)
t, e = time_providers(fns, torch.device("cpu"), Budget(min_rounds=5, max_rounds=15, seconds=3.0))
print("  ".join(f"{n}={x.median_ms:.4f}" for n, x in t.items()))
print({g: (len(x), f"{sum(x)*1e3:.1f} ms total", f"{max(x)*1e3:.2f} max") for g, x in sorted(stats.items())}, "tracked", len(gc.get_objects()))
