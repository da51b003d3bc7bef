from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokencache.keys import Keys, TokenKey, normalize_scope, parse_info

KEYS = Keys("tokencache")
names = st.text(min_size=1).filter(lambda s: s.strip() != "")
scopes = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=("Z", "C"), blacklist_characters=","), min_size=1),
    min_size=1,
    max_size=4,
).map(" ".join)
triples = st.tuples(names, scopes, st.one_of(st.none(), names))


@pytest.mark.parametrize("spelling", ["b a", "a,b", "a  b", " b,a ,a\n", "a\tb"])
def test_scope_normalization(spelling: str) -> None:
    assert normalize_scope(spelling) == "a b"


def test_scope_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="scope"):
        normalize_scope(" , ")
    with pytest.raises(TypeError, match="scope"):
        normalize_scope(["a"])  # type: ignore[arg-type]


def test_info_forms() -> None:
    assert parse_info("s") == TokenKey("default", "s", None)
    assert parse_info(("acct@x", "s"), "u@x") == TokenKey("acct@x", "s", "u@x")
    assert parse_info((None, "s")) == parse_info("s")
    with pytest.raises(TypeError, match="info"):
        parse_info(["acct", "s"])
    with pytest.raises(ValueError, match="sub"):
        parse_info("s", "")


def test_readable_key() -> None:
    key = TokenKey.of(None, "https://www.googleapis.com/auth/cloud-platform", "u@example.com")
    assert KEYS.token(key) == (
        "tokencache:token:default:https%3A//www.googleapis.com/auth/cloud-platform:u@example.com"
    )


@given(triples, triples)
def test_distinct_triples_never_share_a_key(
    a: tuple[str, str, str | None], b: tuple[str, str, str | None]
) -> None:
    ka, kb = TokenKey.of(*a), TokenKey.of(*b)
    assert (ka == kb) == (KEYS.token(ka) == KEYS.token(kb))
    assert (ka == kb) == (KEYS.job_id(ka) == KEYS.job_id(kb))


@given(triples)
def test_keys_decode_back(triple: tuple[str, str, str | None]) -> None:
    key = TokenKey.of(*triple)
    assert KEYS.parse_token(KEYS.token(key)) == key
    job_id = KEYS.job_id(key)
    assert job_id.replace("-", "").replace("_", "").isalnum() and job_id.isascii()


def test_colons_percent_and_unicode() -> None:
    odd = [("a:b", "s", None), ("a", "b:s", None), ("a%3Ab", "s", None), ("é", "ß ü", "用户")]
    encoded = {KEYS.token(TokenKey.of(*t)) for t in odd}
    assert len(encoded) == len(odd)
