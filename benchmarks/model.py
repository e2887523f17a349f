from __future__ import annotations

from typing import List

from .common import Case, RunConfig, status_row

SECTION = "model"


def cases(cfg: RunConfig) -> List[Case]:
    return [Case(SECTION, "model", lambda: [status_row(SECTION, "model", "not available", "not written yet")])]
