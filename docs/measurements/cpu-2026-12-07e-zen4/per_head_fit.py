import time, torch, statistics as st
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(1)
data={H:(torch.randn(1,H,9,18),torch.randn(1,H,729,18),torch.randn(1,H,729,36)) for H in (2,4,8,32,64)}
res={}
for r in range(11):
    for H,(q,k,v) in data.items():
        n=max(5,2400//H)
        fc.attn_fwd(q,k,v,None,0.2)
        t=time.perf_counter()
        for _ in range(n): fc.attn_fwd(q,k,v,None,0.2)
        res.setdefault(H,[]).append((time.perf_counter()-t)/n*1e6)
m={H:st.median(x) for H,x in res.items()}
print({H:round(x,1) for H,x in m.items()})
print("per head L2 (4-2)/2: %.2f  (8-4)/4: %.2f  L3 (64-32)/32: %.2f us" % ((m[4]-m[2])/2, (m[8]-m[4])/4, (m[64]-m[32])/32))
