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
