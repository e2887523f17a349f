import time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(1)
res={}
data={H:(torch.randn(1,H,9,18),torch.randn(1,H,729,18),torch.randn(1,H,729,36)) for H in (2,4,32,128)}
for r in range(9):
    for H,(q,k,v) in data.items():
        n=max(5,3200//H)
        fc.attn_fwd(q,k,v,None,0.2)
        t=time.perf_counter()
        for _ in range(n): fc.attn_fwd(q,k,v,None,0.2)
        res.setdefault(H,[]).append((time.perf_counter()-t)/n/H*1e6)
for H,x in res.items(): print(H, "%.2f us/head"%st.median(x))
