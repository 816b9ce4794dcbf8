"""Learning-rate schedules as multipliers of the base rate at 0-based optimizer step `step`, as transformers
defines them (the first warmup step has rate 0, as in the reference): the `lr_scheduler` config keys."""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def lr_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """step/warmup during warmup (none for "constant"), then 1 ("constant_with_warmup"), a cosine down to 0
    at `total` ("cosine"), or a straight line down to 0 at `total` ("linear")."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

