"""Token sources through real google-auth against the emulator: every kind of account."""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tokencache.core.sources import Sources
from tokencache.errors import (
    ConfigurationError,
    CredentialsRejectedError,
    RateLimitedError,
    RefreshError,
    UnknownAccountError,
)
from tokencache.keys import TokenKey
from tokencache.testing.emulator import Emulator

from .conftest import SCOPE


def key(account: str | None = None, sub: str | None = None, scope: str = SCOPE) -> TokenKey:
    return TokenKey.of(account, scope, sub)


def test_default_and_named_accounts_from_env(credentials_env: dict[str, str], emulator: Emulator) -> None:
    sources = Sources.from_env()
    assert sources.accounts() == sorted(["default", credentials_env["named"]])
    token = sources.fetch(key())
    assert token.token.startswith("ya29.") and abs(token.expires - (time.time() + 3600)) <= 2
    assert emulator.validate(token.token)["email"] == credentials_env["default"]
    named = sources.fetch(key(credentials_env["named"]), account=credentials_env["named"])
    assert emulator.validate(named.token)["email"] == credentials_env["named"]
    assert named.account == credentials_env["named"]


def test_scopes_reach_the_endpoint(credentials_env: dict[str, str], emulator: Emulator) -> None:
    token = Sources.from_env().fetch(key(scope="b a"))
    assert set(emulator.validate(token.token)["scope"].split()) == {"a", "b"}


def test_subject_for_domain_wide_delegation(credentials_env: dict[str, str], emulator: Emulator) -> None:
    token = Sources.from_env().fetch(key(sub="user@example.com"))
    assert token.sub == "user@example.com"
    assert emulator.validate(token.token)["sub"] == "user@example.com"


def test_unknown_account_names_it_and_where_accounts_come_from(credentials_env: dict[str, str]) -> None:
    with pytest.raises(UnknownAccountError) as info:
        Sources.from_env().fetch(key("nobody@example.com"))
    message = str(info.value)
    assert "nobody@example.com" in message
    assert "TOKENCACHE_CREDENTIALS" in message and "GOOGLE_APPLICATION_CREDENTIALS" in message


def test_authorized_user_works_but_cannot_impersonate(tmp_path: Path, emulator: Emulator) -> None:
    path = tmp_path / "adc.json"
    emulator.write_authorized_user(path)
    sources = Sources(files={"default": path}, use_adc=False)
    assert sources.fetch(key()).token.startswith("ya29.")
    with pytest.raises(ConfigurationError, match="cannot act for a subject"):
        sources.fetch(key(sub="user@example.com"))


def test_endpoint_failure_is_a_refresh_error_without_internal_retries(
    credentials_env: dict[str, str], emulator: Emulator
) -> None:
    emulator.config.fail_next = 1
    started = time.monotonic()
    with pytest.raises(RefreshError, match="500"):
        Sources.from_env().fetch(key())
    assert time.monotonic() - started < 0.9  # google-auth's own 1 s retry sleep did not happen
    assert emulator.stats()["token_requests"] == 1


@pytest.mark.parametrize("status", [429, 403])
def test_a_rate_limited_answer_is_its_own_error_with_retry_after_and_is_counted(
    credentials_env: dict[str, str], emulator: Emulator, status: int
) -> None:
    """Google's 429, and the 403 "rate limit exceeded" it may send instead: no retry inside google-auth,
    the Retry-After kept for the fleet's hold, one more in tokencache_endpoint_rate_limited_total."""
    before = REGISTRY.get_sample_value("tokencache_endpoint_rate_limited_total") or 0.0
    emulator.config.update({"fail_next": 1, "failure_status": status, "retry_after": 7})
    started = time.monotonic()
    with pytest.raises(RateLimitedError, match=str(status)) as info:
        Sources.from_env().fetch(key())
    assert time.monotonic() - started < 0.9 and emulator.stats()["token_requests"] == 1
    assert info.value.retry_after == 7 and info.value.hold() == 7
    assert REGISTRY.get_sample_value("tokencache_endpoint_rate_limited_total") == before + 1


def test_errors_are_sorted_into_transient_and_hopeless(
    credentials_env: dict[str, str], emulator: Emulator, tmp_path: Path
) -> None:
    """A 500 or a bare 403 is worth retrying; a key the endpoint rejects (invalid_grant) is not."""
    emulator.config.fail_next = 1
    with pytest.raises(RefreshError) as transient:
        Sources.from_env().fetch(key())
    assert not isinstance(transient.value, RateLimitedError | CredentialsRejectedError)
    info = emulator.create_service_account()
    info["private_key_id"] = "0" * 40  # a key the endpoint does not know (deleted)
    (tmp_path / "deleted.json").write_text(json.dumps(info))
    deleted = Sources(files={"default": tmp_path / "deleted.json"}, use_adc=False)
    with pytest.raises(CredentialsRejectedError, match="invalid_grant"):
        deleted.fetch(key())


def test_retry_after_as_seconds_or_a_date() -> None:
    from tokencache.core.sources import _retry_after

    now = 1_700_000_000.0
    assert (
        _retry_after("5", now) == 5.0
        and _retry_after(None, now) is None
        and _retry_after("soon", now) is None
    )
    assert _retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert _retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0


def test_fetch_is_bounded_by_the_timeout(credentials_env: dict[str, str], emulator: Emulator) -> None:
    emulator.config.latency = 3.0
    sources = Sources.from_env()
    sources.timeout = 0.5
    started = time.monotonic()
    with pytest.raises(RefreshError):
        sources.fetch(key())
    assert time.monotonic() - started < 2.0


def test_bad_configuration_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="neither a file nor a folder"):
        Sources.from_env({"TOKENCACHE_CREDENTIALS": str(tmp_path / "missing")})
    not_a_key = tmp_path / "x.json"
    not_a_key.write_text(json.dumps({"type": "authorized_user"}))
    with pytest.raises(ConfigurationError, match="not a service-account key"):
        Sources.from_env({"TOKENCACHE_CREDENTIALS": str(not_a_key)})
    with pytest.raises(ConfigurationError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        Sources.from_env({"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "nope.json")})


def test_metadata_server_through_adc(tmp_path: Path, emulator: Emulator) -> None:
    """google-auth reads GCE_METADATA_HOST at import, so this runs in a fresh interpreter."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "TOKENCACHE_CREDENTIALS")
    }
    env.update(
        GCE_METADATA_HOST=emulator.metadata_host,
        GCE_METADATA_IP=emulator.metadata_host,
        CLOUDSDK_CONFIG=str(tmp_path),
    )
    code = (
        "from tokencache.core.sources import Sources\n"
        "from tokencache.keys import TokenKey\n"
        "from tokencache import ConfigurationError\n"
        f"s = Sources.from_env()\nprint(s.fetch(TokenKey.of(None, {SCOPE!r}, None)).token)\n"
        f"try:\n    s.fetch(TokenKey.of(None, {SCOPE!r}, 'u@example.com'))\n"
        "except ConfigurationError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    token, refused = out.stdout.strip().splitlines()
    assert emulator.validate(token) is not None
    assert "cannot act for a subject" in refused
    assert emulator.stats()["by_grant"]["metadata"] == 1


def test_folder_skips_files_that_are_not_service_account_keys(tmp_path: Path, emulator: Emulator) -> None:
    email = "sa@tokencache-emulator.iam.gserviceaccount.com"
    emulator.write_service_account(tmp_path / "sa.json", email=email)
    emulator.write_authorized_user(tmp_path / "authorized_user.json")
    sources = Sources.from_env({"TOKENCACHE_CREDENTIALS": str(tmp_path)})
    assert sources.accounts() == ["default", email]
