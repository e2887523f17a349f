import time, torch
import flashsloth_kernels as fk
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(2)
q = torch.randn(1, 1, 9, 18); k = torch.randn(1, 1, 1, 18); v = torch.randn(1, 1, 1, 36)
m = torch.ones(1, 1, dtype=torch.bool)
sc = 18 ** -0.5
fs = {"api": lambda: fk.query_patch_attention(q, k, v, scale=sc), "api-mask": lambda: fk.query_patch_attention(q, k, v, m, sc),
      "api-backend": lambda: fk.query_patch_attention(q, k, v, backend="cpu"), "raw": lambda: fc.attn_fwd(q, k, v, None, sc)}
for r in range(3):
    for n, f in fs.items():
        for _ in range(100): f()
        t = time.perf_counter()
        for _ in range(3000): f()
        print(n, f"{(time.perf_counter()-t)/3000*1e6:.2f} us", end="  ")
    print()
