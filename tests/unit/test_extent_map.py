"""ExtentMap: which byte ranges are data, as the read path and read-around ask."""

from __future__ import annotations

import random

from snapfs.nbd.extents import ExtentMap


def test_has_data_at_the_edges() -> None:
    m = ExtentMap(100, [(10, 20), (40, 50), (20, 25)])  # the first two merge
    assert m.ranges() == [(10, 25), (40, 50)]
    assert not m.has_data(0, 10)
    assert m.has_data(0, 11)
    assert m.has_data(24, 1)
    assert not m.has_data(25, 15)
    assert m.has_data(25, 16)
    assert m.has_data(45, 100)
    assert not m.has_data(50, 50)
    assert not ExtentMap(100, []).has_data(0, 100)


def test_has_data_agrees_with_segments() -> None:
    rng = random.Random(5)
    ranges = [(s, s + rng.randrange(1, 50)) for s in sorted(rng.sample(range(0, 5000), 40))]
    m = ExtentMap(6000, ranges)
    for _ in range(2000):
        offset, length = rng.randrange(0, 6000), rng.randrange(1, 200)
        expected = any(seg.data for seg in m.segments(offset, length))
        assert m.has_data(offset, length) == expected, (offset, length)
