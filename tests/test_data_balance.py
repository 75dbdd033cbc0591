"""The greedy balancer the synthetic world and the probing datasets share."""

from __future__ import annotations

import random
from collections import Counter

from mmscope.data.balance import Balancer


def test_least_used_takes_the_rarest_option_and_breaks_ties_by_one_draw_over_the_sorted_ties():
    balancer, twin = Balancer(random.Random(4)), random.Random(4)
    counts = Counter()
    for step in range(30):
        options = ["red", "blue", "green"] if step % 3 else ["green", "red"]
        low = min(counts[o] for o in options)
        expected = twin.choice(sorted(o for o in options if counts[o] == low))
        assert balancer.least_used("colour", options) == expected
        counts[expected] += 1
    assert balancer.counts["colour"] == counts
    assert max(counts.values()) - min(counts.values()) <= 1


def test_the_order_options_are_listed_in_does_not_change_the_choices():
    listed, reversed_ = Balancer(random.Random(9)), Balancer(random.Random(9))
    options = ["cube", "sphere", "cylinder", "cone"]
    assert [listed.least_used("shape", options) for _ in range(12)] == [
        reversed_.least_used("shape", options[::-1]) for _ in range(12)]


def test_rarest_counts_nothing_and_scopes_keep_separate_counts():
    balancer = Balancer(random.Random(0))
    balancer.count("kind", "object")
    balancer.count("kind", "attribute")
    assert balancer.rarest("kind", ["attribute", "object", "relation"]) == "relation"
    assert balancer.rarest("kind", ["attribute", "object", "relation"]) == "relation"
    assert balancer.counts["kind"] == {"object": 1, "attribute": 1}
    chosen = balancer.least_used(("answer", "LogicalObj"), ["object", "relation"])
    assert balancer.counts[("answer", "LogicalObj")] == {chosen: 1}
    assert balancer.counts["kind"] == {"object": 1, "attribute": 1}
