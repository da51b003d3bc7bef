"""The outcome and verdict enums keep the strings that leave the process: metric labels, RQ results."""

from __future__ import annotations

import re
from collections import Counter

from rq.serializers import JSONSerializer

from tokencache import metrics
from tokencache.outcomes import Invalidation, Outcome, Verdict


def test_metric_labels_never_change() -> None:
    """Dashboards and alerts select on these label values."""
    assert {o.label for o in Outcome} == {
        "refreshed",
        "not_due",
        "busy",
        "failed",
        "gave_up",
        "held_back",
        "deleted",
        "crashed",
        "batched",
        "skipped",
        "held_elsewhere",
        "handed_over",
        "refused",
    }


def test_the_metrics_docstring_names_labels_that_exist() -> None:
    doc = metrics.__doc__ or ""
    line = doc[doc.index("tokencache_refreshes_total") : doc.index("tokencache_refresh_lateness")]
    named = set(re.findall(r"``([a-z_]+)``", line)) - {"tokencache_refreshes_total"}
    assert named == {
        "refreshed",
        "not_due",
        "busy",
        "failed",
        "gave_up",
        "deleted",
        "crashed",
        "batched",
        "skipped",
        "held_back",
        "refused",
    }
    assert named <= {o.label for o in Outcome}


def test_invalidation_labels_never_change_and_the_docstring_names_them() -> None:
    labels = {i.label for i in Invalidation}
    assert labels == {"evicted", "not_stored", "pending", "rate_limited"}
    doc = metrics.__doc__ or ""
    start = doc.index("tokencache_invalidations_total")
    line = doc[start : doc.index("\n\n", start)]  # its own bullet, to the end of its list
    assert set(re.findall(r"``([a-z_]+)``", line)) - {"tokencache_invalidations_total"} == labels
    assert [Invalidation.of_reply(n) for n in (0, 1, 2, 3)] == [
        Invalidation.NOT_STORED,
        Invalidation.EVICTED,
        Invalidation.PENDING,
        Invalidation.RATE_LIMITED,
    ]


def test_members_are_their_strings() -> None:
    assert Outcome.NOT_DUE == "not due" and Outcome.NOT_DUE.label == "not_due"
    assert f"{Outcome.HELD_ELSEWHERE}" == "held elsewhere"
    counted = Counter([Outcome.REFRESHED, Outcome.HELD_ELSEWHERE])
    assert counted == Counter({"refreshed": 1, "held elsewhere": 1})
    assert Counter([Verdict.OK]) == {"ok": 1} and [str(v) for v in Verdict] == ["ok", "enqueue", "drop"]


def test_rq_stores_an_outcome_as_a_plain_string() -> None:
    stored = JSONSerializer.dumps(Outcome.REFRESHED)
    assert stored == b'"refreshed"'
    assert type(JSONSerializer.loads(stored)) is str
