"""Forward-mode AD and torch.func transforms (issue 10 §3): a clear error naming the op and the
alternative, never a silent zero or None tangent; reverse mode and vmap keep working."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import backend_devices

from flashsloth_kernels import _compat, query_patch_attention, spatial_attention_pool


def _sap(device):
    x = torch.randn(1, 9, 4, device=device)
    w1, b1 = torch.randn(3, 4, device=device), torch.randn(3, device=device)
    w2, b2 = torch.randn(1, 3, device=device), torch.randn(1, device=device)
    return x, (w1, b1, w2, b2)


def _attn(device):
    return (torch.randn(1, 2, 3, 4, device=device), torch.randn(1, 2, 7, 4, device=device),
            torch.randn(1, 2, 7, 4, device=device))


def _ops(backend, device):
    """(name, f(first input) -> output, first input) for both ops."""
    x, ws = _sap(device)
    q, k, v = _attn(device)
    return [
        ("spatial_attention_pool",
         lambda t: spatial_attention_pool(t, *ws, window=3, backend=backend), x),
        ("query_patch_attention", lambda t: query_patch_attention(t, k, v, backend=backend), q),
    ]


@pytest.mark.parametrize("backend,device", backend_devices())
def test_forward_ad_dual_tensors_raise(backend, device):
    for name, f, t in _ops(backend, device):
        with fwAD.dual_level():
            dual = fwAD.make_dual(t, torch.ones_like(t))
            with pytest.raises(RuntimeError, match=rf"{name}: forward-mode AD .*reverse mode"):
                f(dual)


def _run_transform(transform, f, t):
    if transform == "jvp":
        return torch.func.jvp(f, (t,), (torch.ones_like(t),))
    if transform == "jacfwd":
        return torch.func.jacfwd(f)(t)
    if transform == "grad":
        return torch.func.grad(lambda a: f(a).sum())(t)
    return torch.func.jacrev(f)(t)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "grad", "jacrev"])
def test_func_transforms_raise_the_projects_message(backend, device, transform):
    for name, f, t in _ops(backend, device):
        with pytest.raises(RuntimeError, match=rf"{name}: torch\.func\..* is not supported") as e:
            _run_transform(transform, f, t)
        assert "setup_context" not in str(e.value)
        assert "reference" in str(e.value)  # names the alternative


@pytest.mark.parametrize("backend,device", backend_devices())
def test_vmap_and_reverse_mode_still_work(backend, device):
    for _name, f, t in _ops(backend, device):
        batched = torch.stack([t, 2 * t])
        got = torch.vmap(f)(batched)
        want = torch.stack([f(t), f(2 * t)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        leaf = t.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(leaf).sum(), leaf)
        assert g.shape == t.shape and torch.isfinite(g).all()


def test_transform_detection_falls_back_without_private_apis(monkeypatch):
    """Without the private interpreter stack a grad transform is still refused (the vmap
    answer needs the stack, so it is not refused either way)."""
    monkeypatch.setattr(_compat, "_private", lambda path: (
        torch._C._are_functorch_transforms_active
        if path == "_C._are_functorch_transforms_active" else None))
    x, ws = _sap("cpu")
    with pytest.raises(RuntimeError, match="spatial_attention_pool: torch.func transforms"):
        torch.func.grad(lambda t: spatial_attention_pool(t, *ws, window=3).sum())(x)


def test_the_named_alternative_supports_forward_mode():
    """The error names the plain-PyTorch reference: jvp through it matches finite differences."""
    from flashsloth_kernels.sap.reference import sap_reference

    x, (w1, b1, w2, b2) = _sap("cpu")
    x, w1, b1, w2, b2 = (t.double() for t in (x, w1, b1, w2, b2))
    tangent = torch.randn_like(x)

    def f(t):
        return sap_reference(t, w1, b1, w2.reshape(-1), b2, 3, 3, 3, 3)

    _, jvp = torch.func.jvp(f, (x,), (tangent,))
    eps = 1e-6
    fd = (f(x + eps * tangent) - f(x - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-7)
