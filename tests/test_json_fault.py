"""The fast path of json_fault (service/domain/profile.py) agrees with the full walk on any
decoded JSON value: it only answers "nothing wrong" where the full walk finds nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.profile import MAX_EXACT_NUMBER, _clean, json_fault

text = st.text(alphabet=st.sampled_from(["a", "é", "\x00", " ", "z"]), max_size=4)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.sampled_from([MAX_EXACT_NUMBER, MAX_EXACT_NUMBER + 1, -MAX_EXACT_NUMBER - 1, 1.5, 2.0**54])
    | text
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=30
)


@settings(max_examples=400, deadline=None)
@given(value=json_values, max_depth=st.integers(min_value=0, max_value=6), numbers=st.booleans())
def test_fast_path_agrees_with_the_full_walk(value: object, max_depth: int, numbers: bool) -> None:
    assert _clean(value, max_depth, numbers) == (json_fault(value, max_depth=max_depth, numbers=numbers) is None)


def test_fast_path_catches_each_fault_kind() -> None:
    assert not _clean({"a": [{"b": "x\x00"}]}, 8, False)
    assert not _clean({"a\x00": 1}, 8, False)
    assert not _clean([[[[]]]], 3, False)
    assert _clean([[[]]], 3, False)
    assert not _clean({"n": 2**53 + 1}, 8, True)
    assert _clean({"n": 2**53 + 1}, 8, False)
    assert _clean({"flag": True, "n": None, "f": 1.5}, 8, True)
