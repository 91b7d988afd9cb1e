"""How Herald's processes use Python's cyclic garbage collector."""

from __future__ import annotations

import gc


def tune_gc(young_threshold: int) -> None:
    """Collect the youngest generation every ``young_threshold`` allocations instead of
    every 700, and leave what exists at start-up (modules, the app, the catalogs) out
    of every collection from now on.

    With Python's defaults a push worker at saturation spent ~13 s of a 55 s run in the
    cyclic collector, each full collection scanning ~200k objects for ~170 ms
    (docs/performance.md, sixth pass). Records are freed by reference counting; the
    collector only finds cycles (futures and their callbacks, exceptions), so a larger
    young generation costs a little memory and rarer, longer young collections.
    """
    if not young_threshold:
        return
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
