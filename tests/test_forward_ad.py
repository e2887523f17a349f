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


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "grad", "jacrev"])
def test_func_transforms_raise_the_projects_message(backend, device, transform):
    for name, f, t in _ops(backend, device):
        g = lambda a: f(a).sum()  # noqa: E731
        run = {
            "jvp": lambda: torch.func.jvp(f, (t,), (torch.ones_like(t),)),
            "jacfwd": lambda: torch.func.jacfwd(f)(t),
            "grad": lambda: torch.func.grad(g)(t),
            "jacrev": lambda: torch.func.jacrev(f)(t),
        }[transform]
        with pytest.raises(RuntimeError, match=rf"{name}: torch\.func\..* is not supported") as e:
            run()
        assert "setup_context" not in str(e.value)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_vmap_and_reverse_mode_still_work(backend, device):
    for name, f, t in _ops(backend, device):
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
