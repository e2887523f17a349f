"""Entry point of ``python -m benchmarks`` and the ``flashsloth-bench`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
