"""The stage ablation (stage-ablation.patch build) for fp32 and fp16 side by side: where the
fp16 forward's extra cycles go. python abldt.py THREADS B VALUES
"""
import os, statistics as st, sys, time, torch
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(int(sys.argv[1])); B = int(sys.argv[2]); vals = sys.argv[3].split(",")
torch.manual_seed(0)
base = [torch.randn(B, 32, n, d) for n, d in ((9, 18), (729, 18), (729, 36))]
sc = 18 ** -0.5
ts = {n: [t.to(dt) for t in base] for n, dt in (("fp32", torch.float32), ("fp16", torch.float16))}
combos = [(n, x) for n in ts for x in vals]
res = {c: [] for c in combos}
reps = max(1, int(0.01 / (0.00017 * B)))
for r in range(12):
    for (n, x) in (combos if r % 2 else combos[::-1]):
        q, k, v = ts[n]; os.environ["FS_EXP"] = x
        fc.attn_fwd(q, k, v, None, sc); t = time.perf_counter()
        for _ in range(reps): fc.attn_fwd(q, k, v, None, sc)
        res[(n, x)].append((time.perf_counter() - t) / reps * 1e3)
keys = B * 32 * 729 / torch.get_num_threads()
for x in vals:
    a, b = st.median(res[("fp32", x)]), st.median(res[("fp16", x)])
    print(f"FS_EXP={x}: fp32 {a*1e-3*3.66e9/keys:.1f} fp16 {b*1e-3*3.66e9/keys:.1f} cycles/key-head (diff {(b-a)*1e-3*3.66e9/keys:.1f})")
