"""The ``flashsloth-bench`` console script: runs the benchmark suite of a source checkout.

The suite (``benchmarks/``) is not shipped in the wheel: a top-level package named
``benchmarks`` in site-packages would collide with other projects'. This entry point finds the
checkout, the one this package was installed from in editable mode (``pip install -e``), else
the current directory, and runs ``benchmarks.cli.main`` from there, as ``python -m benchmarks``
does in the checkout.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence


def _candidates() -> List[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return list(dict.fromkeys([here, os.getcwd()]))


def find_checkout() -> Optional[str]:
    """The source checkout holding benchmarks/cli.py, or None."""
    for root in _candidates():
        if os.path.isfile(os.path.join(root, "benchmarks", "cli.py")) and os.path.isfile(
                os.path.join(root, "benchmarks", "__init__.py")):
            return root
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    root = find_checkout()
    if root is None:
        print("error: flashsloth-bench runs the benchmark suite of a source checkout, which "
              "this installation does not come from: clone the repository and run "
              "`pip install --no-build-isolation -e .[bench]` there (or `python -m benchmarks` "
              "in it)", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "") or "") \
            .startswith(os.path.join(root, "benchmarks")):
        print(f"error: another module named 'benchmarks' is already imported "
              f"({getattr(loaded, '__file__', loaded)}); run `python -m benchmarks` in {root}",
              file=sys.stderr)
        return 2
    from benchmarks.cli import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
