"""The ties between the timing constants hold, and breaking one stops the package from importing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokencache import constants


def test_every_invariant_holds() -> None:
    assert constants.broken_invariants() == []
    assert len(constants.INVARIANTS) >= 15


def test_a_broken_invariant_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "LOCK_RENEW_EVERY", constants.LOCK_TTL)
    assert "a lease survives two lost renewals" in constants.broken_invariants()


def test_the_package_refuses_to_import_with_a_broken_invariant() -> None:
    """python -O strips asserts; the check at import must still run."""
    code = (
        "import pathlib, sys; src = pathlib.Path(sys.argv[1]).read_text()"
        ".replace('LOCK_RENEW_EVERY = 0.125', 'LOCK_RENEW_EVERY = 0.5');"
        "exec(compile(src, 'constants', 'exec'), {'__name__': 'tokencache.constants'})"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code, constants.__file__], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "broken invariants: a lease survives two lost renewals" in out.stderr
