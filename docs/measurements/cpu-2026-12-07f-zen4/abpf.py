"""In-process A/B of a timing build's FS_EXP switch for any B / Lq / dtype (used with
prefetch-fixed-count.patch: FS_EXP=32 the current prefetch_row, 0 a fixed line count a row).
python abpf.py THREADS B LQ VALUES [fp32|fp16|bf16]
"""
import os, statistics as st, sys, time, torch
import flashsloth_kernels.attention.fused_cpu as fc
th = int(sys.argv[1]); torch.set_num_threads(th); B = int(sys.argv[2]); Lq = int(sys.argv[3]); vals = sys.argv[4].split(",")
dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[sys.argv[5] if len(sys.argv) > 5 else "fp32"]
if os.environ.get("PF0"): fc.set_prefetch_min_bytes(0)
torch.manual_seed(0)
q, k, v = (torch.randn(B, 32, n, d).to(dt) for n, d in ((Lq, 18), (729, 18), (729, 36)))
sc = 18 ** -0.5
res = {x: [] for x in vals}
reps = max(1, int(0.02 / (0.0003 * B / th)))
for r in range(16):
    for x in (vals if r % 2 == 0 else vals[::-1]):
        os.environ["FS_EXP"] = x
        fc.attn_fwd(q, k, v, None, sc); t = time.perf_counter()
        for _ in range(reps): fc.attn_fwd(q, k, v, None, sc)
        res[x].append((time.perf_counter() - t) / reps)
base = st.median(res[vals[0]])
for x, y in res.items():
    m = st.median(y); print(f"threads={th} B={B} Lq={Lq} {dt} FS_EXP={x}: {m*1e3:.4f} ms {m*3.66e9*th/(B*32*729):.1f} cyc  ratio {m/base:.3f}")
