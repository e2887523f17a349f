"""In-process A/B of a timing build's switch: the same tensors, rounds interleaved (the order
flipped every round), median per variant.

    python ab_env.py VAR THREADS B LQ LK [ROUNDS] [fwd|bwd] [fp32|fp16|bf16]

"off" runs with VAR unset, "on" with VAR=1 (the build reads it on every call): FS_STATIC
(static units, a timing build of 57f4324), FS_Q8PV (q8-value-lanes.patch), FS_PAIR
(pair-tails.patch). Kernel op, H = 32, Dk / Dv = 18 / 36; prints each median and its ratio to
"off".
"""
import os
import statistics as st
import sys
import time

import torch

import flashsloth_kernels.attention.fused_cpu as fc

var = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))
B, Lq, Lk = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 16
bwd = len(sys.argv) > 7 and sys.argv[7] == "bwd"
dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
    sys.argv[8] if len(sys.argv) > 8 else "fp32"]
torch.manual_seed(0)
q, k, v = (torch.randn(B, 32, n, d).to(dt) for n, d in ((Lq, 18), (Lk, 18), (Lk, 36)))
sc = 18 ** -0.5
out, lse = fc.attn_fwd(q, k, v, None, sc)
g = torch.randn_like(out)
f = (lambda: fc.attn_bwd(g, q, k, v, None, sc, out, lse)) if bwd else \
    (lambda: fc.attn_fwd(q, k, v, None, sc))


def switch(on):
    if on:
        os.environ[var] = "1"
    else:
        os.environ.pop(var, None)


t0 = time.perf_counter()
f()
reps = max(1, int(0.01 / max(time.perf_counter() - t0, 1e-5)))
res = {"off": [], "on": []}
for r in range(rounds):
    for m in (("off", "on") if r % 2 == 0 else ("on", "off")):
        switch(m == "on")
        t = time.perf_counter()
        for _ in range(reps):
            f()
        res[m].append((time.perf_counter() - t) / reps * 1e3)
base = st.median(res["off"])
print(f"{var} threads={sys.argv[2]} B={B} Lq={Lq} Lk={Lk} {'bwd' if bwd else 'fwd'} {dt}: "
      + "  ".join(f"{m}={st.median(x):.4f} ms ({st.median(x) / base:.3f})"
                  for m, x in res.items()))
