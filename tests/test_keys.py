from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rq.job import JOB_ID_PATTERN

from tokencache.keys import Keys, TokenKey, _job_name, normalize_scope, parse_info, parse_job_id
from tokencache.validate import NAMESPACE_PATTERN

KEYS = Keys("tokencache")
names = st.text(min_size=1).filter(lambda s: s.strip() != "")
scopes = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=("Z", "C"), blacklist_characters=","), min_size=1),
    min_size=1,
    max_size=4,
).map(" ".join)
triples = st.tuples(names, scopes, st.one_of(st.none(), names))
namespaces = st.from_regex(NAMESPACE_PATTERN, fullmatch=True).filter(lambda s: s != "rq")
legacy_namespaces = names.filter(lambda s: s == s.strip())
"""Namespaces from before names were checked: their jobs may still sit in Redis."""


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


@given(namespaces, triples)
def test_job_ids_name_their_namespace_and_token(namespace: str, triple: tuple[str, str, str | None]) -> None:
    key = TokenKey.of(*triple)
    job_id = Keys(namespace).job_id(key)
    assert JOB_ID_PATTERN.fullmatch(job_id)  # RQ's own check
    assert parse_job_id(job_id) == (namespace, key)


@given(legacy_namespaces, triples)
def test_job_ids_of_any_earlier_namespace_still_decode(
    namespace: str, triple: tuple[str, str, str | None]
) -> None:
    """So that a worker can tell such a job's namespace and refuse it (it is not its own)."""
    key = TokenKey.of(*triple)
    assert parse_job_id(_job_name(namespace, key)) == (namespace, key)


@given(namespaces, namespaces, triples)
def test_namespaces_never_share_a_job(a: str, b: str, triple: tuple[str, str, str | None]) -> None:
    key = TokenKey.of(*triple)
    assert (a == b) == (Keys(a).job_id(key) == Keys(b).job_id(key))


def test_job_id_format_is_stable_and_short() -> None:
    """Ids are stored in Redis: a change of format would orphan every scheduled job."""
    key = TokenKey.of(None, "https://www.googleapis.com/auth/cloud-platform", "user@example.com")
    assert KEYS.job_id(key) == "tc-JVQ6JUQ6JUdjbG91ZC1wbGF0Zm9ybTp1c2VyQGV4YW1wbGUuY29t"
    odd = TokenKey.of("robot@my-project.iam.gserviceaccount.com", "a:b%G c", None)  # markers spelled out
    assert parse_job_id(KEYS.job_id(odd)) == ("tokencache", odd)


@pytest.mark.parametrize(
    "job_id",
    ["tc-635e7ebecb609f85e7e9b573", "tc-", "tc-YQ", "tc-JVQ6OnM6=", "JVQ6OnM6", "rq-JVQ6OnM6", "tc-@@"],
)
def test_what_is_not_a_job_id(job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        parse_job_id(job_id)
