"""fp32 / fp16 / bf16 forward in one process (kernel op, H = 32, Lq = 9, Lk = 729, 16
interleaved rounds). python dt.py THREADS B
"""
import statistics as st, sys, time, torch
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(int(sys.argv[1])); B = int(sys.argv[2])
torch.manual_seed(0)
base = [torch.randn(B, 32, n, d) for n, d in ((9, 18), (729, 18), (729, 36))]
sc = 18 ** -0.5
ts = {n: [t.to(dt) for t in base] for n, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16))}
res = {n: [] for n in ts}
reps = max(1, int(0.01 / (0.00017 * B)))
for r in range(16):
    for n in (list(ts) if r % 2 else list(ts)[::-1]):
        q, k, v = ts[n]
        fc.attn_fwd(q, k, v, None, sc); t = time.perf_counter()
        for _ in range(reps): fc.attn_fwd(q, k, v, None, sc)
        res[n].append((time.perf_counter() - t) / reps * 1e3)
b = st.median(res["fp32"])
for n, x in res.items(): print(f"threads={sys.argv[1]} B={B} {n}: {st.median(x):.4f} ms  fp32/this {b / st.median(x):.3f}")
