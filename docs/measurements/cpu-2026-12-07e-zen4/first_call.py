"""The first call after three eager calls (whose ~5 MB pass flushes the 1 MB L2) against the
calls after it: whole calls (public function, host function, kernel op; small and EmbQ-sized
inputs), then the public fast path's steps one by one (first call after eager only).

    python first_call.py
"""
import time, torch, statistics as st
import flashsloth_kernels as fk
import flashsloth_kernels.attention.fused_cpu as fc
from flashsloth_kernels.attention import op as aop
from flashsloth_kernels import _compat
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

fused = aop.fused
res={}
for r in range(40):
    for _ in range(3): eager()
    T=[time.perf_counter()]
    torch.compiler.is_compiling(); T.append(time.perf_counter())
    _compat.plain_eager("cpu", q1, k1, v1); T.append(time.perf_counter())
    torch.is_grad_enabled(); q1.requires_grad; T.append(time.perf_counter())
    name = fused.dispatcher._select(None, q1.device, q1.dtype, (("needs_grad", False), ("large", False))); T.append(time.perf_counter())
    h = fused.host(name)[0]; T.append(time.perf_counter())
    o = h(q1,k1,v1,None,0.2); T.append(time.perf_counter())
    o[0].contiguous(); T.append(time.perf_counter())
    for i in range(len(T)-1): res.setdefault(i,[]).append(T[i+1]-T[i])
print([round(st.median(x)*1e6,2) for x in res.values()])
