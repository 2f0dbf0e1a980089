"""psalm.data.text.join_phrases: the one English list join (synthetic captions, PixelLM / Pixel-SAIL answers)."""
import pytest

from psalm.data.text import join_phrases


@pytest.mark.parametrize("items,expected", [
    (["a"], "a"),
    (["a", "b"], "a and b"),
    (["a", "b", "c"], "a, b and c"),  # no serial (Oxford) comma: the generated captions depend on it
    (["a", "b", "c", "d"], "a, b, c and d"),
])
def test_join_phrases(items, expected):
    assert join_phrases(items) == expected


def test_join_phrases_any_iterable_and_str_items():
    assert join_phrases(x for x in ("red circle", "blue square")) == "red circle and blue square"
    assert join_phrases([1, 2, 3]) == "1, 2 and 3"
    assert join_phrases(("x and y", "z")) == "x and y and z"  # phrases are not parsed


def test_join_phrases_empty_is_an_error():
    with pytest.raises(ValueError, match="at least one phrase"):
        join_phrases([])
    with pytest.raises(ValueError, match="at least one phrase"):
        join_phrases(iter(()))


def test_synthetic_caption_uses_the_join():
    from psalm.data.synthetic_language import caption

    objs = [{"center": (x, 0.0), "size": "small", "color": c, "shape": "circle"}
            for x, c in ((30.0, "red"), (10.0, "blue"), (20.0, "green"))]
    assert caption(objs) == ("A small blue circle, a small green circle and a small red circle in front of a wall, "
                             "standing on a tiled floor.")
    with pytest.raises(ValueError, match="at least one phrase"):
        caption([])
