"""Backend choice shared by every op.

Each op owns a :class:`Dispatcher`. A backend registers a *reasons* function that
returns why it cannot run a problem (an empty list means it can). ``"auto"`` walks
the op's preference order for the tensors' device and takes the first backend with
no reasons, remembering the choice per problem key; a backend named explicitly
that cannot run raises :class:`BackendUnavailableError` listing the reasons, it
never silently falls back.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Sequence, Tuple

import torch

from . import _env

ReasonsFn = Callable[..., List[str]]

# Preference order of "auto" per device type (fastest first). Triton on a CPU
# tensor means the interpreter, which is for tests only, so auto never picks it.
# On CUDA this is only the default of a new op: each op sets its own order from its GPU
# measurements (benchmarks/results/<gpu>/), see sap/op.py and attention/op.py.
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# An order that depends on the problem: facts (as passed to select) -> preference order.
OrderRule = Callable[[Dict[str, object]], Sequence[str]]


class BackendUnavailableError(NotImplementedError):
    """A backend named explicitly cannot run these inputs; the message says why."""


# op name -> its Dispatcher, for available_backends()
DISPATCHERS: Dict[str, "Dispatcher"] = {}


class Dispatcher:
    def __init__(self, op: str, order: Dict[str, Tuple[str, ...]] | None = None):
        DISPATCHERS[op] = self
        self.op = op
        self.order = dict(DEFAULT_ORDER if order is None else order)
        self._reasons: Dict[str, ReasonsFn] = {}
        self._auto_cache: Dict[Hashable, str] = {}
        # backends whose reasons depend only on (device type, dtype, facts) and the build,
        # never on the environment: a named one that could run is answered from _named_ok
        self._stable: set = set()
        self._named_ok: set = set()
        self._rules: Dict[str, OrderRule] = {}

    def set_order(self, device_type: str, order: Sequence[str] | OrderRule) -> None:
        """The "auto" preference for ``device_type``: a fixed order, or a rule mapping the
        problem's facts (e.g. its size) to one."""
        if callable(order):
            self._rules[device_type] = order
        else:
            self._rules.pop(device_type, None)
            self.order[device_type] = tuple(order)
        self._auto_cache.clear()

    def register(self, name: str, reasons: ReasonsFn, stable: bool = False) -> None:
        """``reasons``: why ``name`` cannot run a problem. ``stable``: they depend only on the
        device type, dtype and facts and on what is installed (not on environment variables),
        so that a call naming this backend may be answered from a cache once it could run."""
        if name not in _env.BACKENDS or name == "auto":
            raise ValueError(f"unknown backend name {name!r}")
        self._reasons[name] = reasons
        (self._stable.add if stable else self._stable.discard)(name)
        self._auto_cache.clear()
        self._named_ok.clear()

    @property
    def backends(self) -> Tuple[str, ...]:
        return tuple(self._reasons)

    def reasons(self, name: str, device: torch.device, dtype: torch.dtype, **facts) -> List[str]:
        """Why backend ``name`` cannot run this problem (empty list: it can)."""
        fn = self._reasons.get(name)
        if fn is None:
            return [f"backend {name!r} is not implemented for {self.op}"]
        return fn(device, dtype, **facts)

    def select(self, requested: str | None, device: torch.device, dtype: torch.dtype,
               **facts) -> str:
        """Resolve ``requested`` (None, "auto" or a name) to a backend that can run.

        Under torch.compile the answer is computed once at trace time as a constant (facts
        must be plain ints / strs / bools); the public functions use it only to fail early:
        the graph holds the *requested* name, which the op resolves when it runs
        (flashsloth_kernels/_op.py). In eager mode the plain resolution runs: the
        constant-result wrapper costs tens of us a call.
        """
        # in the caller's order, not sorted (~0.4 us a call): a call site passes its facts in
        # one order, and another order is only another cache key with the same answer
        items = tuple(facts.items())
        if torch.compiler.is_compiling():
            return _select_constant(self, requested, device, dtype, items)
        return self._select(requested, device, dtype, items)

    def _select(self, requested, device, dtype, facts_items) -> str:
        if requested is None:
            requested = _env.default_backend()
        key = (device.type, dtype, facts_items)
        if requested == "auto":  # the common case, answered from the cache before any work
            hit = self._auto_cache.get(key)
            if hit is not None:
                return hit
        elif (requested, key) in self._named_ok:  # a validated, stable name that could run
            return requested
        facts = dict(facts_items)
        if not isinstance(requested, str):
            raise TypeError(f"backend: expected a str or None, got {type(requested).__name__}")
        requested = requested.lower()
        if requested not in _env.BACKENDS:
            raise ValueError(
                f"backend: expected one of {', '.join(_env.BACKENDS)} or None, got {requested!r}"
            )
        if requested != "auto":
            why = self.reasons(requested, device, dtype, **facts)
            if why:
                raise BackendUnavailableError(
                    f"{self.op}: backend {requested!r} cannot run this input: " + "; ".join(why)
                    + " (use backend='auto' to pick one that can)"
                )
            if requested in self._stable:
                self._named_ok.add((requested, key))
            return requested
        tried: List[str] = []
        for name in self._order_for(device, facts):
            why = self.reasons(name, device, dtype, **facts)
            if not why:
                self._auto_cache[key] = name
                return name
            tried.append(f"{name}: {'; '.join(why)}")
        raise BackendUnavailableError(
            f"{self.op}: no backend can run this input ({' | '.join(tried)})")

    def _order_for(self, device: torch.device, facts: Dict[str, object] | None = None
                   ) -> Sequence[str]:
        rule = self._rules.get(device.type)
        if rule is not None:
            return tuple(rule(facts or {}))
        return self.order.get(device.type, ("reference",))

    def explain(self, device: torch.device, dtype: torch.dtype, **facts) -> Dict[str, List[str]]:
        """Every registered backend's reasons for this problem (empty list: can run)."""
        return {name: self.reasons(name, device, dtype, **facts) for name in self._reasons}


def available_backends(device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> Dict[str, Dict[str, List[str]]]:
    """For every op, each backend's reasons it cannot run on ``device`` / ``dtype`` here
    (an empty list means it can), e.g. to see why "auto" did not pick the C++ kernels."""
    device = torch.device(device)
    return {op: d.explain(device, dtype) for op, d in DISPATCHERS.items()}


@torch.compiler.assume_constant_result
def _select_constant(dispatcher: "Dispatcher", requested, device, dtype, facts_items) -> str:
    return dispatcher._select(requested, device, dtype, facts_items)


def cpu_reasons_for(ext_module: str) -> ReasonsFn:
    """Reasons function of a C++ CPU backend whose kernels live in ``ext_module``."""

    def cpu_reasons(device: torch.device, dtype: torch.dtype, **_) -> List[str]:
        from ._ext import ext_error

        why = []
        if device.type != "cpu":
            why.append(f"the cpu backend needs CPU tensors, got device {device.type!r}")
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            why.append(f"dtype {dtype} is not supported (float64, float32, float16, bfloat16)")
        err = ext_error(ext_module)
        if err is not None:
            why.append(f"the C++ extension {ext_module} is not built ({err})")
        return why

    return cpu_reasons


def triton_reasons(device: torch.device, dtype: torch.dtype, **_) -> List[str]:
    """Reasons shared by the Triton backends."""
    from ._ext import triton_error

    why = []
    err = triton_error()
    if err is not None:
        why.append(err)
    if device.type == "cuda":
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            why.append(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
    elif device.type == "cpu" and _env.triton_interpret():
        if dtype not in (torch.float32, torch.float16):
            why.append(
                f"dtype {dtype} is not supported by Triton's interpreter (float32, float16; "
                "bfloat16 runs on GPU only)"
            )
    else:
        why.append(
            "Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got {device.type!r}"
        )
    return why


def reference_reasons(device: torch.device, dtype: torch.dtype, **_) -> List[str]:
    if not dtype.is_floating_point:
        return [f"dtype {dtype} is not a floating-point type"]
    return []
