"""Host cost of a Timeline span call when the timeline is disabled (CPU only)."""
from __future__ import annotations

from .common import Report, host_us

NEEDS_GPU = False


def run(rep: Report) -> None:
    import lowlevel

    tl = lowlevel.Timeline(enabled=False)

    def spanned():
        with tl.span("x"):
            pass

    def bare():
        pass

    rep.add("disabled Timeline.span enter+exit", host_us(spanned, n=200000, warmup=1000), "us",
            "an empty Python call", host_us(bare, n=200000, warmup=1000), target="<= 0.2 us")
