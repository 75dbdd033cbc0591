"""Property-based tests of the validators at the API's door (hypothesis): whatever a user passes, the answer is a
valid value or an `MMScopeError` naming the argument — never a foreign exception, never a silently repaired
value."""

from __future__ import annotations

import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmscope.errors import MMScopeError
from mmscope.interventions import ActivationPatch, Intervention, Knockout, SkipLayers, Truncate, knockout_window

# What a user might pass where a layer number goes: whole numbers (out of range too), bools, floats (NaN,
# infinities, fractions, whole-valued), strings, None.
ANYTHING = st.one_of(st.integers(-5, 70), st.integers(-3, 3), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                     st.just(2.0), st.text(max_size=3), st.none())
LAYER_LISTS = st.one_of(ANYTHING, st.lists(ANYTHING, max_size=5), st.tuples(ANYTHING, ANYTHING))


def whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@settings(max_examples=400, deadline=None)
@given(center=ANYTHING, k=ANYTHING, n_layers=ANYTHING)
def test_a_knockout_window_is_a_valid_run_of_layers_or_a_refusal_naming_what_is_wrong(center, k, n_layers):
    try:
        window = knockout_window(center, k, n_layers)
    except MMScopeError as error:
        assert any(name in str(error) for name in ("n_layers", "window k", "centre layer")), str(error)
        return
    assert whole(center) and whole(k) and whole(n_layers)  # nothing else is rounded into a window
    assert 1 <= len(window) <= k and window == tuple(range(window[0], window[-1] + 1))
    assert 0 <= window[0] and window[-1] < n_layers and center in window
    assert k <= max(1, 2 * n_layers - 2)


@settings(max_examples=400, deadline=None)
@given(layers=LAYER_LISTS, heads=st.one_of(st.none(), LAYER_LISTS))
@example(layers=[-1], heads=None)
@example(layers=[3], heads=[-2])
@example(layers=[2, 2], heads=None)
@example(layers=[math.nan], heads=None)
@example(layers=2.0, heads=None)
def test_a_knockout_holds_distinct_whole_layers_and_heads_or_is_refused_naming_the_field(layers, heads):
    try:
        knockout = Knockout("image", "last", layers, heads)
    except MMScopeError as error:
        assert "Knockout.layers" in str(error) or "Knockout.heads" in str(error), str(error)
        return
    for values in (knockout.layers, knockout.heads or ()):
        assert all(whole(value) for value in values) and len(set(values)) == len(values)
    assert knockout.layers and all(value >= 0 for value in knockout.layers)
    assert Intervention.from_dict(knockout.to_dict()) == knockout  # and it round-trips


@settings(max_examples=300, deadline=None)
@given(layers=LAYER_LISTS, which=st.sampled_from(["skip", "truncate", "patch"]))
@example(layers=-1, which="truncate")
@example(layers=[-1], which="skip")
@example(layers=[0, -4], which="patch")
def test_other_interventions_take_whole_layers_or_refuse_naming_the_field(layers, which):
    make = {"skip": lambda: SkipLayers(layers), "truncate": lambda: Truncate(layers),
            "patch": lambda: ActivationPatch("residual", layers, "image")}[which]
    name = {"skip": "SkipLayers.layers", "truncate": "Truncate.layer", "patch": "ActivationPatch.layers"}[which]
    try:
        made = make()
    except MMScopeError as error:
        assert name in str(error), str(error)
        return
    values = (made.layer,) if which == "truncate" else made.layers
    assert all(whole(value) and value >= 0 for value in values) and len(set(values)) == len(values)
    assert not any(isinstance(value, float) and math.isnan(value) for value in values)
