"""Python and dispatch cost of each step of the public call, on a tiny problem (the kernel
itself negligible): best of 5 x 2000 calls.
"""
import timeit, torch
torch.set_num_threads(2)
import flashsloth_kernels.attention.fused_cpu as fc
from flashsloth_kernels.attention import op
from flashsloth_kernels import _compat
q, k, v = torch.randn(1, 32, 9, 18), torch.randn(1, 32, 729, 18), torch.randn(1, 32, 729, 36)
sc = 18 ** -0.5
kop = torch.ops.flashsloth.query_patch_attention_fwd
kd = kop.default
fused = op.fused
def t(name, f, n=2000):
    best = min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6
    print(f"{name}: {best:.2f} us")
# tiny problem: overhead only
qs, ks, vs = torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2)
t("kernel op overload (tiny)", lambda: kd(qs, ks, vs, None, 0.5))
t("kernel op packet (tiny)", lambda: kop(qs, ks, vs, None, 0.5))
t("host attn_fwd (tiny)", lambda: fc.attn_fwd(qs, ks, vs, None, 0.5))
t("public (tiny)", lambda: op.query_patch_attention(qs, ks, vs, scale=0.5))
t("plain_eager", lambda: _compat.plain_eager("cpu", qs, ks, vs))
t("is_compiling", lambda: torch.compiler.is_compiling())
t("_select", lambda: fused.dispatcher._select(None, qs.device, qs.dtype, (("needs_grad", False), ("large", False))))
t("host(name)", lambda: fused.host("cpu"))
t("isa.apply", lambda: fc._isa.apply())
t("empty x2", lambda: (torch.empty(1, 1, 1, 2), torch.empty(1, 1, 1)))
t("_fast_call", lambda: op._fast_call(qs, ks, vs, None, 0.5, None))
t("fused.fast_call", lambda: fused.fast_call((qs, ks, vs, None, 0.5, None), (qs, ks, vs), qs.device, qs.dtype, large=False))
t("q.device", lambda: qs.device)
t("q.shape x3 + dtype", lambda: (qs.shape, ks.shape, vs.shape, qs.dtype, ks.dtype))
t("dev cmp", lambda: ks.device != qs.device)
t("nothing_observes", lambda: _compat.nothing_observes(qs, ks, vs))
t("is_grad_enabled", lambda: torch.is_grad_enabled())
t("autocast", lambda: torch.is_autocast_enabled("cpu"))
t("contiguous", lambda: qs.contiguous())
