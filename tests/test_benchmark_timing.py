"""The benchmarks' interleaved timing: the order alternates, ratios pair runs of one round."""

from __future__ import annotations

import pytest

from benchmarks.timing import interleave, paired_ratios, summary


def test_interleave_reverses_the_order_every_other_round():
    order: list[str] = []
    seconds = interleave({name: (lambda name=name: order.append(name)) for name in "abc"}, repeats=4)
    assert order == list("abccbaabccba")
    assert {name: len(s) for name, s in seconds.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(s >= 0 for runs in seconds.values() for s in runs)
    with pytest.raises(ValueError, match="repeats=0"):
        interleave({"a": lambda: None}, repeats=0)


def test_paired_ratios_and_summary():
    assert paired_ratios([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == [2.0, 1.0, 4.0]
    assert summary([2.0, 1.0, 4.0], ".2f") == "2.00 (1.00..4.00, n=3)"
    with pytest.raises(ValueError, match="pair runs of the same rounds"):
        paired_ratios([1.0], [1.0, 2.0])
