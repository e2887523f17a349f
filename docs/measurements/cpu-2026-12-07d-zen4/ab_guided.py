import sys, os, time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(int(sys.argv[1]))
B, Lq, Lk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 20
torch.manual_seed(0)
q = torch.randn(B, 32, Lq, 18); k = torch.randn(B, 32, Lk, 18); v = torch.randn(B, 32, Lk, 36)
sc = 18 ** -0.5
f = lambda: fc.attn_fwd(q, k, v, None, sc)
def setm(m):
    if m == "static": os.environ["FS_STATIC"] = "1"
    else: os.environ.pop("FS_STATIC", None)
outs = {}
for m in ("static", "dynamic"):
    setm(m); outs[m] = f()
assert all(torch.equal(a, b) for a, b in zip(outs["static"], outs["dynamic"]))
t0 = time.perf_counter(); f(); one = time.perf_counter() - t0
reps = max(1, int(0.01 / max(one, 1e-5)))
res = {m: [] for m in ("static", "dynamic")}
for r in range(rounds):
    for m in res:
        setm(m)
        t = time.perf_counter()
        for _ in range(reps): f()
        res[m].append((time.perf_counter() - t) / reps * 1e3)
b = st.median(res["static"])
print(f"threads={sys.argv[1]} B={B} Lq={Lq} Lk={Lk}: " + "  ".join(f"{m}={st.median(x):.4f}ms({st.median(x)/b:.3f}) q25={st.quantiles(x)[0]:.4f}" for m, x in res.items()))
