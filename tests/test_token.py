from __future__ import annotations

import pytest

from tokencache import Freshness, Token, mask


def make(**kw: object) -> Token:
    fields: dict[str, object] = dict(token="ya29.a0-secret-token-f3k", scope="a", expires=1_000)
    fields.update(kw)
    return Token(**fields)  # type: ignore[arg-type]


def test_keyword_construction_and_equality_by_fields() -> None:
    assert make() == make()
    assert make() != make(sub="x@example.com")
    assert make().type == "Bearer" and make().account is None


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        make().token = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("token", "", ValueError),
        ("token", None, TypeError),
        ("scope", "  ", ValueError),
        ("scope", 3, TypeError),
        ("expires", 1.5, TypeError),
        ("expires", "1000", TypeError),
        ("expires", True, TypeError),
        ("expires", -1, ValueError),
        ("sub", "", ValueError),
        ("account", 7, TypeError),
        ("type", "", ValueError),
    ],
)
def test_bad_fields_name_the_field(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        make(**{field: value})


def test_repr_masks_the_token() -> None:
    text = repr(make())
    assert "secret" not in text
    assert "ya29.a0…f3k" in text
    assert mask("short") == "…"


def test_freshness_states() -> None:
    token = make(expires=100)
    assert token.freshness(10, now=50) is Freshness.FRESH
    assert token.freshness(10, now=91) is Freshness.STALE
    assert token.freshness(10, now=99.5) is Freshness.INVALID
    assert token.freshness(10, now=200) is Freshness.INVALID
