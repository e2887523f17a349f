import os, sys, time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(int(sys.argv[1]))
B, Lq, Lk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
knobs = sys.argv[5].split(",")
rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 15
torch.manual_seed(0)
q = torch.randn(B, 32, Lq, 18); k = torch.randn(B, 32, Lk, 18); v = torch.randn(B, 32, Lk, 36)
fc._isa.apply()
op = torch.ops.flashsloth.query_patch_attention_fwd
sc = 18 ** -0.5
for kn in knobs:
    os.environ["FS_KNOB"] = kn; op(q, k, v, None, sc)
reps = max(1, int(0.02 / max(1e-5, (lambda t0: (op(q, k, v, None, sc), time.perf_counter() - t0)[1])(time.perf_counter()))))
res = {kn: [] for kn in knobs}
for r in range(rounds):
    for kn in knobs:
        os.environ["FS_KNOB"] = kn
        t = time.perf_counter()
        for _ in range(reps): op(q, k, v, None, sc)
        res[kn].append((time.perf_counter() - t) / reps * 1e3)
base = st.median(res[knobs[0]])
print(f"threads={sys.argv[1]} B={B} Lq={Lq} Lk={Lk} reps={reps}: " + "  ".join(
    f"k{kn}={st.median(xs):.4f}ms({st.median(xs)/base:.3f})" for kn, xs in res.items()))
