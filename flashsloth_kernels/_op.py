"""The scaffolding every op is built on (see docs/adding_an_op.md).

An op ``NAME`` (``spatial_attention_pool``, ``query_patch_attention``) is:

* a :class:`FusedOp`, which owns the op's :class:`~._dispatch.Dispatcher` with the four
  backends registered the same way for every op (``reference`` always; ``cpu``, ``triton``,
  ``cuda`` with reasons that also say when their host module is missing), and the cached host
  functions of each backend: ``<prefix>_fwd`` / ``<prefix>_bwd`` in
  ``flashsloth_kernels/<folder>/fused_<backend>.py`` (the reference's are given explicitly);
* two ``torch.library`` custom ops, ``flashsloth::NAME`` and ``flashsloth::NAME_backward``,
  defined by :meth:`FusedOp.define` with their fake kernels, the autograd glue, the FLOP
  formulas (``torch.utils.flop_counter``) and the autocast rule, and
* the public function, which validates its inputs, calls :meth:`FusedOp.check` (forward-mode
  AD and torch.func transforms get a clear error), resolves the backend and calls
  :meth:`FusedOp.call`.

Backend resolution happens twice with the same answer: in the public function (so that a
backend that cannot run raises before any work) and inside the op's implementation, which
receives the *requested* name ("auto" or an explicit one). A graph captured by torch.export or
torch.compile therefore holds "auto", resolved where the program runs: an exported program
saved on a CPU machine runs the Triton kernels when loaded with CUDA tensors. An explicitly
named backend is part of the graph as it is.

Autocast: inside ``torch.autocast(device, dtype)``, the forward op casts its fp32 / fp16 /
bf16 tensors to the autocast dtype (the rule of autocast's matmul-class ops: fp32 weights and
16-bit activations both become ``dtype``), then runs with autocast disabled, so every backend
computes the documented math (fp32 accumulation, one rounding to ``dtype`` at the end) and
returns ``dtype``. Inputs holding a float64 tensor are not cast. The backward op runs with
autocast disabled as well.

Eager bypass (both ops): an eager call that no autocast, mode, transform or tensor subclass
observes runs the op's implementation directly instead of the registered op; when it needs
gradients, through an autograd.Function built from the op's own setup_context and backward
(whose backward op is bypassed the same way, unless create_graph asks for its graph). The
autograd path of the registered op cost ~0.13 ms of the ~1.3 ms forward + backward of the
EmbQ attention at B = 1 (2 threads, torch 2.13). Measured
with ``python scripts/bench_op_dispatch.py`` (shared, loaded 2-core CPU, 1 thread, torch 2.13):
the op's dispatch costs 61 us on the B = 1 EmbQ attention call (673 us -> 734 us, 9%) and 14 us
on a small SAP call (51 -> 64 us, 27%), so the bypass stays. Establishing "nothing observes"
uses private torch APIs isolated in :mod:`._compat`; without them every call goes through the
op (tested).

Fast path (the attention): the public function's checks, dtype, transform and backend
questions cost ~30 us of Python per call, ~12% of the B = 1 EmbQ forward's ~0.25 ms.
:meth:`FusedOp.fast_call` runs a call whose inputs the public function found valid in a few
comparisons (attention/op.py ``_fast_call``) with ~6 us: one plain-eager test
(:func:`._compat.plain_eager`), the dispatcher's cached resolution and the host function. It
declines (None) everything else, which then takes the full path above.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _checks, _compat, _cuda_ext, _env
from ._dispatch import Dispatcher, cpu_reasons_for, reference_reasons, triton_reasons

Tensor = torch.Tensor
HostPair = Tuple[Callable[..., Any], Callable[..., Any]]

NAMESPACE = "flashsloth"
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
# torch.library.Library objects must outlive their registrations.
_LIBRARIES: List[torch.library.Library] = []


@functools.lru_cache(maxsize=None)
def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def autocast_on(device: torch.device) -> bool:
    """Whether an autocast region the ops follow (CPU or CUDA) is active for ``device``."""
    return device.type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device.type)


def autocast_dtype(device: torch.device, *tensors: Optional[Tensor]) -> Optional[torch.dtype]:
    """The dtype the forward op casts ``tensors`` to under autocast on ``device``, or None (no
    autocast there, or a float64 tensor among them: no cast)."""
    if not autocast_on(device):
        return None
    if any(t is not None and t.is_floating_point() and t.dtype not in _AUTOCAST_ELIGIBLE
           for t in tensors):
        return None
    return torch.get_autocast_dtype(device.type)


def compute_dtype(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> torch.dtype:
    """The dtype the op computes in for these floating-point inputs: the autocast dtype inside
    an autocast region (dtypes may then differ, devices may not), else their one common dtype
    (a TypeError naming both dtypes otherwise)."""
    device = ref.device
    # autocast_dtype answers None outside autocast: asked only inside (~1 us a call)
    cast = autocast_dtype(device, ref, *others.values()) if autocast_on(device) else None
    if cast is None:
        _checks.same_dtype_device(ref_name, ref, **others)
        return ref.dtype
    for name, t in others.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {device}, "
                             f"got {t.device}")
    return cast


def _autocast_cast(dtype: torch.dtype, value):
    if isinstance(value, Tensor) and value.dtype in _AUTOCAST_ELIGIBLE:
        return value.to(dtype)
    return value


def _register_autocast(qualname: str, cast: bool) -> None:
    """Autocast kernels of a custom op (CPU and CUDA): cast eligible floating tensors to the
    autocast dtype when ``cast``, then call the op again with autocast disabled."""
    ns, name = qualname.split("::")
    lib = torch.library.Library(ns, "FRAGMENT")
    _LIBRARIES.append(lib)
    for device_type, key in _AUTOCAST_KEYS.items():

        def kernel(*args, _device_type=device_type):
            op = getattr(getattr(torch.ops, ns), name).default
            tensors = [a for a in args if isinstance(a, Tensor)]
            dtype = autocast_dtype(torch.device(_device_type), *tensors) if cast else None
            if dtype is not None:
                args = tuple(_autocast_cast(dtype, a) for a in args)
            with torch.autocast(_device_type, enabled=False):
                return op(*args)

        lib.impl(name, kernel, key)


def cuda_reasons_needing_triton_backward(device: torch.device, dtype: torch.dtype,
                                         **facts) -> List[str]:
    """The ``cuda`` backend's reasons: the CUDA extension's, plus (for a call that needs
    gradients) Triton, which runs the backward of both ops on CUDA."""
    why = _cuda_ext.cuda_reasons(device, dtype, **facts)
    if facts.get("needs_grad"):
        from ._ext import triton_error

        err = triton_error()
        if err is not None:
            why.append(f"its backward runs the Triton kernels, and {err}")
    return why


def _eager_autograd_function(name: str, forward: Callable, setup_context: Callable,
                             backward: Callable) -> type:
    """An autograd.Function with the op's forward implementation and the autograd glue it
    registers (setup_context, backward): what the registered op runs under autograd, without
    the custom op's dispatch (measured at B = 1: ~0.3 ms of Python per forward + backward of
    the EmbQ attention, as long as its kernels' ~0.9 ms)."""

    class EagerAutograd(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return forward(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerAutograd.__name__ = EagerAutograd.__qualname__ = f"{name}_eager"
    return EagerAutograd


def forward_unset(*args):
    raise RuntimeError("FusedOp.define() was not called")


class FusedOp:
    """One op's backends, host functions and registered custom ops (see the module doc)."""

    def __init__(self, name: str, folder: str, prefix: str, reference_hosts: HostPair,
                 plain_reference: str):
        self.name = name
        # the plain-PyTorch function of the math, for error messages (differentiable in every
        # mode, as composite torch code)
        self.plain_reference = plain_reference
        self.folder = folder
        self.prefix = prefix
        self.dispatcher = Dispatcher(name)
        self._hosts: Dict[str, HostPair] = {"reference": reference_hosts}
        self.op: Any = None
        self._forward_impl: Callable[..., Any] = forward_unset
        self._backward_impl: Callable[..., Any] = forward_unset
        self._eager_autograd: Any = None
        self.backward_op: Any = None
        self.dispatcher.register("reference", reference_reasons, stable=True)
        self.dispatcher.register(
            "cpu", self._needs_module("cpu", cpu_reasons_for(f"flashsloth_kernels.{folder}._C")),
            stable=True)
        self.dispatcher.register("triton", self._needs_module("triton", triton_reasons))
        self.dispatcher.register("cuda", self._needs_module(
            "cuda", cuda_reasons_needing_triton_backward))

    def host_module(self, backend: str) -> str:
        return f"flashsloth_kernels.{self.folder}.fused_{backend}"

    def _needs_module(self, backend: str, reasons: Callable[..., List[str]]):
        module = self.host_module(backend)

        def fn(device: torch.device, dtype: torch.dtype, **facts) -> List[str]:
            if not _module_exists(module):
                return [f"its host module {module} is not in this installation"]
            return reasons(device, dtype, **facts)

        return fn

    def host(self, backend: str) -> HostPair:
        """(forward, backward) host functions of ``backend``, its module imported once."""
        fns = self._hosts.get(backend)
        if fns is None:
            mod = importlib.import_module(self.host_module(backend))
            fns = (getattr(mod, f"{self.prefix}_fwd"), getattr(mod, f"{self.prefix}_bwd"))
            self._hosts[backend] = fns
        return fns

    # --- backend choice ------------------------------------------------------------------
    def requested(self, backend: Optional[str]) -> str:
        """The backend a call asks for, validated: None reads FLASHSLOTH_BACKEND."""
        if backend is None:
            backend = _env.default_backend()
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
        name = backend.lower()
        if name not in _env.BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(_env.BACKENDS)} or None, "
                             f"got {backend!r}")
        return name

    def resolve(self, requested: str, device: torch.device, dtype: torch.dtype,
                needs_grad: bool, **facts) -> str:
        """The backend that runs this call; ``facts`` (plain ints / bools) are what an op's
        size-dependent "auto" order reads."""
        return self.dispatcher.select(requested, device, dtype, needs_grad=needs_grad, **facts)

    # --- registration --------------------------------------------------------------------
    def define(self, forward: Callable, forward_fake: Callable, backward_impl: Callable,
               backward_fake: Callable, setup_context: Callable, backward: Callable,
               flops: Callable, backward_flops: Callable) -> None:
        """Define ``flashsloth::NAME`` and ``flashsloth::NAME_backward`` from their
        implementations (type-annotated: the schemas are inferred from them)."""
        qual = f"{NAMESPACE}::{self.name}"
        self._forward_impl = forward
        self._backward_impl = backward_impl
        self._eager_autograd = _eager_autograd_function(self.name, forward, setup_context,
                                                        backward)
        self.op = torch.library.custom_op(qual, mutates_args=())(forward)
        self.op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(qual + "_backward", mutates_args=())(
            backward_impl)
        self.backward_op.register_fake(backward_fake)
        self.op.register_autograd(backward, setup_context=setup_context)
        _register_autocast(qual, cast=True)
        _register_autocast(qual + "_backward", cast=False)
        ops = getattr(torch.ops, NAMESPACE)
        register_flop_formula(getattr(ops, self.name))(flops)
        register_flop_formula(getattr(ops, self.name + "_backward"))(backward_flops)

    def define_kernels(self, forward_schema: str, backward_schema: str,
                       forward_fake: Callable, backward_fake: Callable) -> None:
        """Define the compiled kernels' ops ``flashsloth::NAME_fwd`` / ``NAME_bwd`` (one schema
        for every device; csrc/<folder>/*_cpu.cpp and *_cuda.cpp register their CPU and CUDA
        kernels by dispatch key with TORCH_LIBRARY_IMPL) and their fake kernels, so they can be
        traced (FakeTensor, torch.compile, opcheck) on their own."""
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        _LIBRARIES.append(lib)
        for schema, fake in ((forward_schema, forward_fake), (backward_schema, backward_fake)):
            name = schema.split("(", 1)[0]
            lib.define(schema)
            torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)

    # --- calls ---------------------------------------------------------------------------
    def check_transforms(self, *tensors: Optional[Tensor]) -> None:
        """Forward-mode AD and torch.func's grad transforms are not supported: raise a
        RuntimeError naming the op and what to use instead (never a silent zero tangent)."""
        alternative = ("use reverse mode (loss.backward() or torch.autograd.grad), or the "
                       f"plain-PyTorch {self.plain_reference}, which every transform supports")
        kind = _compat.functorch_transform("jvp", "grad", "transform")
        if kind is not None:
            what = {"jvp": "torch.func.jvp / jacfwd (forward-mode AD)",
                    "grad": "torch.func.grad / jacrev / vjp"}.get(kind, "torch.func transforms")
            raise RuntimeError(f"{self.name}: {what} is not supported by its registered op; "
                               f"{alternative} (torch.vmap is supported)")
        if _compat.has_forward_grad(*tensors):
            raise RuntimeError(f"{self.name}: forward-mode AD (torch.autograd.forward_ad) is not "
                               f"supported by its fused kernels; {alternative}")

    def call(self, args: Sequence[Any], tensors: Sequence[Optional[Tensor]],
             device: torch.device, resolved: Optional[str] = None) -> Any:
        """Run the op on ``args`` (its schema's arguments, the requested backend last)
        through the registered op, or, when nothing observes, its implementation directly
        (no gradient needed) or through an autograd.Function with the op's own autograd glue
        (gradients needed). ``resolved``: the backend the public function resolved the
        requested one to; the bypass names it (the implementation's own resolution is then a
        cache hit: ~1 us a call less than "auto"'s), the registered op keeps the requested
        name (a graph holds "auto", resolved where it runs)."""
        present = [t for t in tensors if t is not None]
        if not self._unobserved(present, device):
            return self.op(*args)
        if resolved is not None:
            args = (*args[:-1], resolved)
        return self._run_unobserved(args, present)

    def fast_call(self, args: Sequence[Any], tensors: Sequence[Tensor], device: torch.device,
                  dtype: torch.dtype, **facts) -> Any:
        """The public function's fast path: run ``args`` (as :meth:`call`'s, the requested
        backend last) as :meth:`call` runs an unobserved call, for inputs the public function
        has already found valid and non-degenerate without building any message (``tensors``:
        the call's tensors, no None, all plain ``torch.Tensor`` of ``dtype`` on ``device``;
        ``facts``: those of :meth:`resolve` but ``needs_grad``). Without gradients the resolved
        backend's host function runs directly (what the op's implementation runs for such
        inputs), so the caller returns its outputs as the implementation would (contiguous).
        Returns None, having done nothing, when the call is not plain eager (compile, trace,
        autocast, a mode, a transform, a forward-AD level): the public function's full path
        then takes it. Measured on the B = 1 EmbQ attention (2-core AMD EPYC Zen 4): ~6 us of
        Python over the kernel op instead of ~30, and ~0.08 ms less per call when other work
        runs between calls (as in the benchmark's interleaved rounds)."""
        if torch.compiler.is_compiling() or not _compat.plain_eager(device.type, *tensors):
            return None
        needs_grad = False
        if torch.is_grad_enabled():
            for t in tensors:
                needs_grad = needs_grad or t.requires_grad
        # the dispatcher's cached resolution (not compiling: checked above), the requested
        # name validated there as in resolve(); facts in resolve()'s order: one cache key
        name = self.dispatcher._select(args[-1], device, dtype,
                                       (("needs_grad", needs_grad), *facts.items()))
        if needs_grad:
            return self._eager_autograd.apply(*args[:-1], name)
        return self.host(name)[0](*args[:-1])

    def _run_unobserved(self, args: Sequence[Any], present: Sequence[Tensor]) -> Any:
        if torch.is_grad_enabled() and any(t.requires_grad for t in present):
            return self._eager_autograd.apply(*args)
        return self._forward_impl(*args)

    def call_backward(self, args: Sequence[Any], tensors: Sequence[Optional[Tensor]],
                      device: torch.device) -> Any:
        """The backward op on ``args`` (from the op's autograd backward), or its implementation
        directly when nothing observes and no graph of the backward is being built
        (create_graph=True goes through the op, whose missing autograd then raises)."""
        present = [t for t in tensors if t is not None]
        if (not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
                and self._unobserved(present, device)):
            return self._backward_impl(*args)
        return self.backward_op(*args)

    @staticmethod
    def _unobserved(tensors: Sequence[Tensor], device: torch.device) -> bool:
        """No compile / trace, autocast, dispatch or torch-function mode, functorch transform,
        forward-AD level or tensor subclass could see the call: the bypass is then
        indistinguishable from the registered op."""
        return not torch.compiler.is_compiling() and _compat.plain_eager(device.type, *tensors)
