"""The cost of the software prefetch and of DRAM, 1 thread: cycles a key and head for B = 1
(5 MB of K and V) to 16 (82 MB), prefetch forced on and off, one process, 8 interleaved
rounds. python pen2.py THREADS
"""
import statistics as st, sys, time, torch
import flashsloth_kernels.attention.fused_cpu as fc
torch.manual_seed(0)
sc = 18 ** -0.5
th = int(sys.argv[1]); torch.set_num_threads(th)
Bs = (1, 2, 4, 8, 16)
data = {B: [torch.randn(B, 32, n, d) for n, d in ((9, 18), (729, 18), (729, 36))] for B in Bs}
res = {}
for r in range(8):
    for B in Bs:
        for pf in ("on", "off"):
            fc.set_prefetch_min_bytes(0 if pf == "on" else 1 << 40)
            q, k, v = data[B]
            reps = max(1, int(0.02 / (0.00032 * B / th)))
            fc.attn_fwd(q, k, v, None, sc); t = time.perf_counter()
            for _ in range(reps): fc.attn_fwd(q, k, v, None, sc)
            res.setdefault((B, pf), []).append((time.perf_counter() - t) / reps)
fc.set_prefetch_min_bytes(None)
for B in Bs:
    print(f"threads={th} B={B} ({B*5.1:.0f} MB): " + "  ".join(f"pf {pf} {st.median(res[(B, pf)])*3.66e9*th/(B*32*729):.1f}" for pf in ("on", "off")) + " cycles/key-head/core")
