"""Stage ablation of the fp32 forward (a timing build with stage-ablation.patch applied).

    LK=729 python abl.py THREADS B LQ VALUES   (e.g. abl.py 1 1 9 0,1,2,4,8,15)

FS_EXP (read per call) skips stages of the Lq = 9 (q8) path: 1 P x V, 2 the 8-query block's
exp pass, 4 the single query's dot products, 8 the 8-query block's score loops. Outputs are
wrong then; only the time counts. Kernel op, H = 32, Dk / Dv = 18 / 36, 16 interleaved rounds,
medians, cycles at 3.66 GHz per key and head per thread.
"""
import os, statistics as st, sys, time, torch
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(int(sys.argv[1])); B = int(sys.argv[2]); Lq = int(sys.argv[3]) if len(sys.argv) > 3 else 9
vals = sys.argv[4].split(",") if len(sys.argv) > 4 else ["0", "1", "2", "4", "8", "15"]
LK = int(os.environ.get("LK", 729)); torch.manual_seed(0)
q, k, v = (torch.randn(B, 32, n, d) for n, d in ((Lq, 18), (LK, 18), (LK, 36)))
sc = 18 ** -0.5
f = lambda: fc.attn_fwd(q, k, v, None, sc)
res = {x: [] for x in vals}
reps = max(1, int(0.01 / (0.0002 * B)))
for r in range(16):
    for x in (vals if r % 2 == 0 else vals[::-1]):
        os.environ["FS_EXP"] = x
        f(); t = time.perf_counter()
        for _ in range(reps): f()
        res[x].append((time.perf_counter() - t) / reps * 1e3)
base = st.median(res["0"]); keys = B * 32 * LK / torch.get_num_threads()
for x, y in res.items():
    m = st.median(y); print(f"FS_EXP={x}: {m:.4f} ms  {m*1e-3*3.66e9/keys:.1f} cycles/key-head  (-{(base-m)*1e-3*3.66e9/keys:.1f})")
