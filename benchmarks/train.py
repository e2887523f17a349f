from __future__ import annotations

from typing import List

from .common import Case, RunConfig, status_row

SECTION = "train"


def cases(cfg: RunConfig) -> List[Case]:
    return [Case(SECTION, "train", lambda: [status_row(SECTION, "train", "not available", "not written yet")])]
