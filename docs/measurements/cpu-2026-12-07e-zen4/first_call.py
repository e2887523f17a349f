import time, torch, statistics as st
import flashsloth_kernels as fk
import flashsloth_kernels.attention.fused_cpu as fc
torch.set_num_threads(2)
q=torch.randn(1,32,9,18); k=torch.randn(1,32,729,18); v=torch.randn(1,32,729,36)
q1=torch.randn(1,32,9,18); k1=torch.randn(1,32,8,18); v1=torch.randn(1,32,8,36)
def eager():
    s = (q @ k.transpose(-1,-2)) * 0.2
    return torch.softmax(s, -1) @ v
op=torch.ops.flashsloth.query_patch_attention_fwd
fns={"api-small":lambda: fk.query_patch_attention(q1,k1,v1,scale=0.2),
     "raw-small":lambda: fc.attn_fwd(q1,k1,v1,None,0.2),
     "op-small":lambda: op(q1,k1,v1,None,0.2,0),
     "op-big":lambda: op(q,k,v,None,0.2,0),
     "empty2":lambda: torch.empty(1,32,9,36),
     "py":lambda: fk.query_patch_attention.__name__}
for name, f in fns.items():
    firsts=[]; rest=[]
    for r in range(40):
        for _ in range(3): eager()
        ts=[]
        for _ in range(6):
            a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
        firsts.append(ts[0]); rest.append(st.median(ts[1:]))
    print(name, "first %.1f us, rest %.1f us" % (st.median(firsts)*1e6, st.median(rest)*1e6))
