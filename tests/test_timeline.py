"""Timeline: trace JSON, overlap arithmetic (CPU, synthetic spans); real overlap on a GPU."""
import json
import os

import pytest

import lowlevel
from lowlevel.timeline import _NULL


def _tl():
    tl = lowlevel.Timeline()
    tl.add("mm0", "compute", 0.0, 4.0)
    tl.add("mm1", "compute", 4.0, 8.0)
    tl.add("copy0", "comm", 4.0, 7.0)
    tl.add("copy1", "comm", 8.0, 11.0)
    return tl


def test_chrome_trace_fields_and_load(tmp_path):
    tl = _tl()
    path = str(tmp_path / "trace.json")
    tl.to_chrome_trace(path)
    trace = json.load(open(path))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 4
    for e in xs:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
    names = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert set(names) == {"compute", "comm"} and len(set(names.values())) == 2
    c1 = next(e for e in xs if e["name"] == "copy1")
    assert c1["ts"] == 8000.0 and c1["dur"] == 3000.0 and c1["tid"] == names["comm"]


def test_overlap_arithmetic():
    tl = _tl()
    st = tl.stats()
    assert st["wall_ms"] == 11.0
    assert st["busy_ms"] == {"compute": 8.0, "comm": 6.0}
    assert st["total_busy_ms"] == 14.0
    assert abs(st["achieved_speedup"] - 14 / 11) < 1e-12 and abs(st["ideal_speedup"] - 14 / 8) < 1e-12
    assert tl.overlap_ms("compute", "comm") == 3.0
    tl2 = lowlevel.Timeline()
    tl2.add("a", "x", 0, 2)
    tl2.add("b", "x", 1, 3)  # overlapping spans on one track count once
    assert tl2.stats()["busy_ms"] == {"x": 3.0}
    with pytest.raises(ValueError):
        tl2.add("bad", "x", 2, 1)
    assert lowlevel.Timeline().stats()["wall_ms"] == 0.0


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = _tl().plot(str(tmp_path / "t.png"))
    assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"


def test_disabled_timeline_records_nothing():
    tl = lowlevel.Timeline(enabled=False)
    with tl.span("x"):
        pass
    assert tl.span("y") is _NULL and tl.resolve() == []
    assert lowlevel.timeline.active_timeline() is None
    with tl.activate():
        assert lowlevel.timeline.active_timeline() is tl
    assert lowlevel.timeline.active_timeline() is None


@pytest.mark.gpu
def test_gpu_overlapping_and_sequential_spans():
    from lowlevel.testing import spin

    a, b = lowlevel.Stream(), lowlevel.Stream()
    tl = lowlevel.Timeline(labels={a: "A", b: "B"})
    with tl.span("k0", a):
        spin(5_000_000, stream=a)
    with tl.span("k1", b):
        spin(5_000_000, stream=b)
    a.synchronize(), b.synchronize()
    assert tl.overlap_ms("A", "B") > 3.0
    seq = lowlevel.Timeline(labels={a: "A", b: "B"})
    with seq.span("k0", a):
        spin(5_000_000, stream=a)
    ev = lowlevel.Event().record(a)
    b.wait(ev)
    with seq.span("k1", b):
        spin(5_000_000, stream=b)
    b.synchronize()
    assert seq.overlap_ms("A", "B") < 0.2
    assert 9.5 < seq.stats()["wall_ms"] < 15


@pytest.mark.gpu
def test_runtimes_record_into_an_active_timeline():
    from lowlevel.testing import spin

    tl = lowlevel.Timeline()
    runner = lowlevel.ParallelRunner(1)
    tl.label(runner.streams[0], "aux")
    with tl.activate():
        runner(lambda: spin(3_000_000), [lambda: spin(3_000_000)])
    spans = tl.resolve()
    assert {s.name for s in spans} == {"default", "aux0"}
    assert tl.overlap_ms("aux", next(s.track for s in spans if s.name == "default")) > 2.0


def test_plot_window(tmp_path):
    pytest.importorskip("matplotlib")
    tl = lowlevel.Timeline()
    tl.add("a", "x", 0.0, 1.0)
    tl.add("b", "y", 10.0, 12.0)
    path = tl.plot(str(tmp_path / "w.png"), window_ms=(9.0, 13.0))
    assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
    for bad, exc in (((3.0, 3.0), ValueError), ((5.0, 1.0), ValueError), ((0.0, float("nan")), ValueError),
                     (5.0, TypeError), ((1.0,), TypeError), (("a", 1.0), TypeError), ((True, 2.0), TypeError)):
        with pytest.raises(exc, match="window_ms"):
            tl.plot(str(tmp_path / "bad.png"), window_ms=bad)
    assert not os.path.exists(tmp_path / "bad.png")


def test_plot_window_labels_stay_inside_the_window(tmp_path, monkeypatch):
    """A span crossing the window's edge was labelled at its own middle, outside the axes: the
    figure shrank to fit the label (window (0, 6) around a 5-20 ms span), and a window much
    narrower than such a span failed in FreeType ("raster overflow")."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    seen = []
    real_savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        seen.append([(t.get_position()[0], t.get_text()) for ax in fig.axes for t in ax.texts])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    tl = lowlevel.Timeline()
    tl.add("a", "x", 0.0, 1.0)
    tl.add("long span", "x", 5.0, 20.0)
    tl.add("b", "y", 2.0, 4.0)
    tl.plot(str(tmp_path / "edge.png"), window_ms=(0.0, 6.0))
    assert sorted(name for _, name in seen[-1]) == ["a", "b", "long span"]
    assert all(0.0 <= x <= 6.0 for x, _ in seen[-1])
    path = tl.plot(str(tmp_path / "narrow.png"), window_ms=(10.0, 10.0 + 1e-6))
    assert [name for _, name in seen[-1]] == ["long span"] and 10.0 <= seen[-1][0][0] <= 10.0 + 1e-6
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_plot_that_fails_to_save_closes_its_figure(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    with pytest.raises(FileNotFoundError):
        _tl().plot(str(tmp_path / "missing" / "t.png"))
    assert plt.get_fignums() == before
