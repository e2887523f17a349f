"""FLOP counting: every FLOP number the suite reports comes from here.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions, attention and
every op with a registered formula (the package registers one per fused op), forward and
backward. Counting on the meta device costs no compute, which is how the 3.2B presets are
counted on any machine. Elementwise work (softmax, GELU, norms) is not counted by design:
the totals are the matmul-class work that dominates these models.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs counted while ``fn()`` runs (forward, plus backward if fn runs one)."""
    return count_flops_by_op(fn)[0]


def count_flops_by_op(fn: Callable[[], object]) -> Tuple[int, Dict[str, int]]:
    """(total, {op name: FLOPs}) counted while ``fn()`` runs."""
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    per_op: Dict[str, int] = {}
    for module_counts in (mode.get_flop_counts().get("Global", {}),):
        for op, n in module_counts.items():
            per_op[str(op)] = per_op.get(str(op), 0) + int(n)
    return int(mode.get_total_flops()), per_op
