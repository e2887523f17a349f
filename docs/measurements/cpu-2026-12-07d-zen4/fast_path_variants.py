import sys, time, torch, statistics as st
sys.path.insert(0, ".")  # run from the repository root
import flashsloth_kernels as fk
import flashsloth_kernels.attention.fused_cpu as fc
from flashsloth_kernels.attention import op as aop
from flashsloth_kernels import _env, _compat
import torch.nn.functional as F
from benchmarks.timing import time_providers, Budget
Tensor = torch.Tensor
_stack = torch._C._len_torch_dispatch_stack
_fmode = torch._C._is_torch_function_mode_enabled
_ftr = torch._C._are_functorch_transforms_active
_is_comp = torch.compiler.is_compiling
_ac = torch.is_autocast_enabled
from torch.autograd import forward_ad
cache = {}
def checks(q, k, v, scale):
    qs, ks, vs = q.shape, k.shape, v.shape
    if (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and ks[0] == qs[0] and ks[1] == qs[1]
            and ks[3] == qs[3] and vs[0] == qs[0] and vs[1] == qs[1] and vs[2] == ks[2]
            and 0 < qs[3] <= 256 and 0 < vs[3] <= 256 and qs[0] and qs[1] and qs[2] and ks[2]):
        return qs[3] ** -0.5 if scale is None else (scale if type(scale) is float and 0.0 < scale <= 1e4 else None)
def observers_inline(dev):
    return (not _is_comp() and _stack() == 0 and not _fmode() and not _ftr()
                    and forward_ad._current_level < 0 and not _ac(dev.type))
def observers_compat(dev, q, k, v):
    return not _is_comp() and _compat.plain_eager(dev.type, q, k, v)
def resolve_cache(dev, dt):
    key = (dev.type, dt, _env._raw("FLASHSLOTH_BACKEND"))
    host = cache.get(key)
    if host is None:
        name = aop.fused.resolve(aop.fused.requested(None), dev, dt, False, large=False)
        host = cache[key] = aop.fused.host(name)[0]
    return host
def resolve_select(dev, dt, q, k, v):
    ng = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = aop.fused.dispatcher._select(None, dev, dt, (("needs_grad", ng), ("large", False)))
    return aop.fused.host(name)[0]
def mk(obs, res):
    def f(q, k, v, scale):
        if type(q) is Tensor and type(k) is Tensor and type(v) is Tensor:
            sc = checks(q, k, v, scale)
            dt, dev = q.dtype, q.device
            if sc is not None and k.dtype is dt and v.dtype is dt and k.device == dev and v.device == dev:
                if (observers_inline(dev) if obs == 0 else observers_compat(dev, q, k, v)):
                    host = resolve_cache(dev, dt) if res == 0 else resolve_select(dev, dt, q, k, v)
                    return host(q, k, v, None, sc)[0]
        raise RuntimeError
    return f
torch.set_num_threads(2)
B=1; Lq=9
torch.manual_seed(0)
q = torch.randn(B, 32, Lq, 18); k = torch.randn(B, 32, 729, 18); v = torch.randn(B, 32, 729, 36)
sc = 18 ** -0.5
fns = {"api": lambda: fk.query_patch_attention(q, k, v, scale=sc), "_fast_call": lambda: aop._fast_call(q, k, v, None, sc, None)}
for o in (0, 1):
    for r in (0, 1):
        g = mk(o, r); fns[f"obs{o}res{r}"] = (lambda g=g: g(q, k, v, sc))
fns["raw"] = lambda: fc.attn_fwd(q, k, v, None, sc)
def eager():
    s = (q @ k.transpose(-1, -2)) * sc
    return s.softmax(-1) @ v
fns["eager"] = eager
fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, scale=sc)
for rep in range(4):
    t, e = time_providers(fns, torch.device("cpu"), Budget(min_rounds=5, max_rounds=15, seconds=6.0))
    r = t["raw"].median_ms
    print("  ".join(f"{n}={(x.median_ms-r)*1e3:+.0f}us" for n, x in t.items() if n != "raw"), f"raw={r:.4f}")
