"""A packed call's typed fact: how its tokens and cost are shared among its items."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from skinflint.pipeline.context import PackedItems


def test_tokens_are_shared_by_weight_in_whole_parts() -> None:
    packed = PackedItems((0, 1, 2), (10, 20, 70))
    assert packed.shares(100) == [10, 20, 70]
    assert packed.shares(7) == [1, 1, 5]
    assert packed.fractions() == [0.1, 0.2, 0.7]
    assert PackedItems((4, 5), (0, 0)).shares(3) in ([2, 1], [1, 2])


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=60), st.integers(0, 10**7))
def test_the_shares_always_sum_to_the_total(weights: list[int], total: int) -> None:
    packed = PackedItems(tuple(range(len(weights))), tuple(weights))
    parts = packed.shares(total)
    assert sum(parts) == total and all(p >= 0 for p in parts)
    assert abs(sum(packed.fractions()) - 1) < 1e-9
