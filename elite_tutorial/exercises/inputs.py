"""What the checks build their inputs from: the toy components, loaded once per session whatever
preset the notebook uses, and a guard that keeps a check's random draws out of the notebook's."""
from __future__ import annotations

from functools import lru_cache, wraps

import torch

from ..components import Components, load_components


@lru_cache(maxsize=1)
def toy_components() -> Components:
    """The toy preset's components on the CPU in float32 (loaded by the first check that needs them)."""
    with torch.random.fork_rng(devices=[]):
        return load_components("toy", device="cpu", dtype=torch.float32)


def keeps_global_rng(check):
    """Run `check` on a copy of the global RNG: building models draws from it, and a chapter's later
    cells must draw the same numbers whether or not its checks ran."""
    @wraps(check)
    def run(student) -> None:
        with torch.random.fork_rng(devices=[]):
            check(student)
    return run
