import sys, os, time, torch, statistics as st
sys.path.insert(0, os.environ.get("FS_EXP_TREE", "."))  # the timing build (a patched checkout)
import flashsloth_kernels.attention.fused_cpu as fc
print("extension:", fc.__file__)
torch.set_num_threads(int(sys.argv[1]))
B, Lq, Lk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 20
modes = sys.argv[6].split(",") if len(sys.argv) > 6 else ["base", "pfv", "l256", "l256+pfv"]
torch.manual_seed(0)
q = torch.randn(B, 32, Lq, 18); k = torch.randn(B, 32, Lk, 18); v = torch.randn(B, 32, Lk, 36)
sc = 18 ** -0.5
f = lambda: fc.attn_fwd(q, k, v, None, sc)
def setm(m):
    for var, key in (("FS_L256", "l256"), ("FS_PFV", "pfv"), ("FS_PFK", "pfk")):
        if key in m.split("+") or (key == "pfv" and "pfk" in m.split("+")): os.environ[var] = "1"
        else: os.environ.pop(var, None)
outs = {}
for m in modes:
    setm(m); outs[m] = f()[0]
for m in modes:
    base = "+".join(x for x in m.split("+") if x not in ("pfv", "pfk")) or "base"
    if base in outs:
        assert torch.equal(outs[m], outs[base]), m
t0 = time.perf_counter(); f(); one = time.perf_counter() - t0
reps = max(1, int(0.01 / max(one, 1e-5)))
res = {m: [] for m in modes}
for r in range(rounds):
    for m in (modes if r % 2 == 0 else modes[::-1]):
        setm(m)
        t = time.perf_counter()
        for _ in range(reps): f()
        res[m].append((time.perf_counter() - t) / reps * 1e3)
b = st.median(res[modes[0]])
print(f"threads={sys.argv[1]} B={B} Lq={Lq} Lk={Lk}: " + "  ".join(f"{m}={st.median(x):.4f}({st.median(x)/b:.3f})" for m, x in res.items()))
