"""Host cost of a Timeline span call when the timeline is disabled (CPU only)."""
from __future__ import annotations

from .common import Report, host_us_side_by_side

NEEDS_GPU = False


def run(rep: Report) -> None:
    import lowlevel

    tl = lowlevel.Timeline(enabled=False)

    def spanned():
        with tl.span("x"):
            pass

    def bare():
        pass

    ours, theirs = host_us_side_by_side(spanned, bare, n=200000, warmup=1000)
    rep.add("disabled Timeline.span enter+exit", ours, "us", "an empty Python call", theirs, target="<= 0.2 us")
