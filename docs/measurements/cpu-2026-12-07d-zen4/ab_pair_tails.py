import sys, os, time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(int(sys.argv[1]))
B, Lq, Lk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 16
dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[sys.argv[6] if len(sys.argv) > 6 else "fp32"]
torch.manual_seed(0)
q = torch.randn(B, 32, Lq, 18).to(dt); k = torch.randn(B, 32, Lk, 18).to(dt); v = torch.randn(B, 32, Lk, 36).to(dt)
sc = 18 ** -0.5
f = lambda: fc.attn_fwd(q, k, v, None, sc)
def setm(m):
    if m == "pair": os.environ["FS_PAIR"] = "1"
    else: os.environ.pop("FS_PAIR", None)
t0 = time.perf_counter(); f(); one = time.perf_counter() - t0
reps = max(1, int(0.01 / max(one, 1e-5)))
res = {m: [] for m in ("base", "pair")}
for r in range(rounds):
    for m in (list(res) if r % 2 == 0 else list(res)[::-1]):
        setm(m)
        t = time.perf_counter()
        for _ in range(reps): f()
        res[m].append((time.perf_counter() - t) / reps * 1e3)
b = st.median(res["base"])
print(f"threads={sys.argv[1]} B={B} Lq={Lq} Lk={Lk} {dt}: " + "  ".join(f"{m}={st.median(x):.4f}({st.median(x)/b:.3f})" for m, x in res.items()))
