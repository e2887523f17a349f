"""Query-to-patch attention (EmbQ's i2q step): placeholder until the op lands."""
from __future__ import annotations

from typing import List

from .common import Case, RunConfig, status_row

SECTION = "ops/attention"


def cases(cfg: RunConfig) -> List[Case]:
    return [Case(SECTION, "attention", lambda: [status_row(SECTION, "attention", "not available",
                                                            "not written yet")])]
