import sys, time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(int(sys.argv[1])); B = int(sys.argv[2])
torch.manual_seed(0)
q = torch.randn(B, 32, 9, 18); k = torch.randn(B, 32, 729, 18); v = torch.randn(B, 32, 729, 36)
data = {"fp32": (q, k, v), "bf16": tuple(t.bfloat16() for t in (q, k, v)), "fp16": tuple(t.half() for t in (q, k, v))}
res = {n: [] for n in data}
for r in range(12):
    for n, (a, b, c) in data.items():
        fc.attn_fwd(a, b, c, None, 0.2)
        reps = max(1, int(0.02 / (B * 0.0002)))
        t = time.perf_counter()
        for _ in range(reps): fc.attn_fwd(a, b, c, None, 0.2)
        res[n].append((time.perf_counter() - t) / reps * 1e3)
b = st.median(res["fp32"])
print(f"threads={sys.argv[1]} B={B}: " + "  ".join(f"{n}={st.median(x):.4f}ms ({st.median(x)/b:.3f})" for n, x in res.items()))
