"""Step-level beam search guided by a (process) reward, as in search-and-learn.

``budget`` beams are generated at every step.  The ``beam_width`` best unfinished beams by
aggregated reward are kept and each expands into ``budget // beam_width`` children (forks that
share the beam's KV); the others are released at once.  Finished beams are collected until
``budget`` of them exist or none is left running.  The answer is the one with the largest sum of
rewards over the finished beams (``select="vote"``, the default, as weighted best-of-N chooses)
or the best finished beam (``select="argmax"``): with a reward that ties (the arithmetic
checker), the best beam is a draw among ties that gets worse as the budget prunes more.
"""
from __future__ import annotations

from infera.scaling.search import Search, SearchGen
from infera.scaling.sampling import pick_weighted
from infera.scaling.selection import argmax, check_select


def beam_search(s: Search, beam_width: int | None = None, select: str = "vote") -> SearchGen:
    width = beam_width if beam_width is not None else max(1, s.budget // 4)
    if not isinstance(width, int) or not 1 <= width <= s.budget:
        raise ValueError(f"beam_width must be an integer in [1, budget={s.budget}], got {beam_width!r}")
    check_select(select)
    children_per_beam = s.budget // width
    beams = (yield from s.expand([(s.root, s.budget)]))[0]
    completed = []
    while True:
        yield from s.score(beams)
        completed += [b for b in beams if b.finished]
        active = sorted((b for b in beams if not b.finished), key=s.value, reverse=True)  # stable on ties
        if not active or len(completed) >= s.budget:
            for b in active:
                s.release(b)
            break
        for b in active[width:]:
            s.release(b)
        beams = [c for kids in (yield from s.expand([(b, children_per_beam) for b in active[:width]])) for c in kids]
    if select == "vote":
        return pick_weighted(s, completed)
    return s.finish(completed[argmax([s.value(b) for b in completed])], completed)
