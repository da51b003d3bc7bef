"""The emulator through real google-auth: every grant, the metadata server, failure injection."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import google.auth
import pytest
import requests
from google.auth import _exponential_backoff, compute_engine, crypt, exceptions, jwt
from google.auth.compute_engine import _metadata
from google.auth.transport.requests import Request
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from tokencache.testing.emulator import (
    DEFAULT_ACCOUNT_EMAIL,
    JWT_BEARER,
    PROJECT_ID,
    TOKEN_PREFIX,
    Emulator,
    EmulatorConfig,
)

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
FLAVOR = {"Metadata-Flavor": "Google"}
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    """The shared emulator with default config and zeroed counters, so tests stay independent."""
    emulator.config = EmulatorConfig()
    emulator.reset_stats()
    return emulator


@pytest.fixture(scope="module")
def sa_info(emulator: Emulator) -> dict[str, str]:
    return emulator.create_service_account()


@pytest.fixture(scope="module")
def other_info(emulator: Emulator) -> dict[str, str]:
    return emulator.create_service_account()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def google_request(http: requests.Session) -> Request:
    return Request(session=http)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """google-auth retries 5xx after 1 s, 2 s... sleeps; skip them so failure tests stay fast."""
    monkeypatch.setattr(_exponential_backoff, "time", SimpleNamespace(sleep=lambda _seconds: None))


@pytest.fixture
def on_gce(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """Point google-auth's metadata client at the emulator.

    _metadata reads GCE_METADATA_HOST once, at import, so the module attribute is patched too;
    GCE_METADATA_IP (the ping target) is read on every call.
    """
    monkeypatch.setenv("GCE_METADATA_HOST", emu.metadata_host)
    monkeypatch.setenv("GCE_METADATA_IP", emu.metadata_host)
    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", emu.metadata_host)
    return emu


def _utcnow() -> dt.datetime:
    """Naive UTC, as google-auth stores expiry."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _sa_credentials(info: dict[str, str], **kwargs: Any) -> service_account.Credentials:
    return service_account.Credentials.from_service_account_info(info, scopes=SCOPES, **kwargs)


def _assertion(
    info: dict[str, str], *, key_id: str | None = None, times: tuple[int, int] = (0, 3600), **claims: Any
) -> str:
    """A hand-made assertion, for the cases google-auth would never produce; times are iat, exp from now."""
    now = int(time.time())
    payload = {
        "iss": info["client_email"],
        "aud": info["token_uri"],
        "iat": now + times[0],
        "exp": now + times[1],
        "scope": " ".join(SCOPES),
        **claims,
    }
    signer = crypt.RSASigner.from_string(info["private_key"], key_id)
    token: bytes = jwt.encode(signer, payload)
    return token.decode()


def _post_token(http: requests.Session, emu: Emulator, **form: str) -> requests.Response:
    return http.post(emu.token_uri, data=form, timeout=10)


# -- service accounts (jwt-bearer) ---------------------------------------------------------


def test_service_account_refresh(emu: Emulator, sa_info: dict[str, str], google_request: Request) -> None:
    emu.config.lifetime = 1234
    creds = _sa_credentials(sa_info)
    creds.refresh(google_request)

    assert creds.token.startswith(TOKEN_PREFIX)
    expected = _utcnow() + dt.timedelta(seconds=1234)
    assert abs((creds.expiry - expected).total_seconds()) < 5
    stats = emu.stats()
    assert stats["token_requests"] == stats["issued"] == 1
    assert stats["by_grant"] == {"jwt-bearer": 1, "refresh_token": 0, "metadata": 0}
    assert stats["by_account"] == {sa_info["client_email"]: 1}
    info = emu.validate(creds.token)
    assert info is not None
    assert info["email"] == sa_info["client_email"]
    assert info["scope"] == SCOPES[0]
    assert "sub" not in info


def test_key_file_format(emu: Emulator, tmp_path: Path, google_request: Request) -> None:
    path = tmp_path / "key.json"
    info = emu.write_service_account(path, email="writer@tokencache-emulator.iam.gserviceaccount.com")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == info
    assert info["type"] == "service_account"
    assert info["token_uri"] == emu.token_uri
    assert info["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert len(info["private_key_id"]) == 40
    creds = service_account.Credentials.from_service_account_file(str(path), scopes=SCOPES)
    creds.refresh(google_request)
    assert emu.stats()["by_account"] == {"writer@tokencache-emulator.iam.gserviceaccount.com": 1}


def test_subject_is_recorded(emu: Emulator, sa_info: dict[str, str], google_request: Request) -> None:
    creds = _sa_credentials(sa_info, subject="user@example.com")
    creds.refresh(google_request)

    info = emu.validate(creds.token)
    assert info is not None
    assert info["sub"] == "user@example.com"


def test_mismatched_private_key_is_refused(
    emu: Emulator, sa_info: dict[str, str], other_info: dict[str, str], google_request: Request
) -> None:
    forged = {**sa_info, "private_key": other_info["private_key"]}
    with pytest.raises(exceptions.RefreshError, match=r"invalid_grant: Invalid JWT Signature"):
        _sa_credentials(forged).refresh(google_request)
    assert emu.stats()["failed"] == 1  # a 400 is final: google-auth does not retry it


def test_unknown_key_id_is_refused(emu: Emulator, sa_info: dict[str, str], google_request: Request) -> None:
    forged = {**sa_info, "private_key_id": "0" * 40}
    with pytest.raises(exceptions.RefreshError, match="unknown key id"):
        _sa_credentials(forged).refresh(google_request)


@pytest.mark.parametrize(
    ("claims", "error", "words"),
    [
        ({"aud": "http://127.0.0.1:1/elsewhere"}, "invalid_grant", "audience"),
        ({"iss": "someone@else.iam.gserviceaccount.com"}, "invalid_grant", "iss"),
        ({"times": (-4000, -400)}, "invalid_grant", "expired"),
        ({"times": (600, 1200)}, "invalid_grant", "future"),
        ({"times": (0, 7200)}, "invalid_grant", "60 minutes"),
        ({"iat": "now"}, "invalid_grant", "numeric"),
        ({"scope": ""}, "invalid_scope", "scope"),
    ],
)
def test_bad_claims_are_refused(
    emu: Emulator,
    sa_info: dict[str, str],
    http: requests.Session,
    claims: dict[str, Any],
    error: str,
    words: str,
) -> None:
    assertion = _assertion(sa_info, key_id=sa_info["private_key_id"], **claims)
    response = _post_token(http, emu, grant_type=JWT_BEARER, assertion=assertion)

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert words in response.json()["error_description"]


@pytest.mark.parametrize(
    "claims",
    [
        {},  # aud is the emulator's own token_uri
        {"aud": "https://oauth2.googleapis.com/token"},  # what google-auth actually signs
        {"times": (-3000, -10)},  # expired, but within the clock skew
    ],
)
def test_good_assertions_are_accepted(
    emu: Emulator, sa_info: dict[str, str], http: requests.Session, claims: dict[str, Any]
) -> None:
    assertion = _assertion(sa_info, key_id=sa_info["private_key_id"], **claims)
    response = _post_token(http, emu, grant_type=JWT_BEARER, assertion=assertion)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == SCOPES[0]
    assert response.headers["Cache-Control"] == "no-store"


def test_assertion_without_kid_is_matched_by_issuer(
    emu: Emulator, sa_info: dict[str, str], http: requests.Session
) -> None:
    response = _post_token(http, emu, grant_type=JWT_BEARER, assertion=_assertion(sa_info))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({}, "unsupported_grant_type"),
        ({"grant_type": JWT_BEARER}, "invalid_request"),
        ({"grant_type": JWT_BEARER, "assertion": "not-a-jwt"}, "invalid_grant"),
        ({"grant_type": JWT_BEARER, "assertion": "a+b.c/d.e"}, "invalid_grant"),
        ({"grant_type": JWT_BEARER, "assertion": "e30.W10.AAAA"}, "invalid_grant"),  # {} . []
    ],
)
def test_malformed_token_requests(
    emu: Emulator, http: requests.Session, form: dict[str, str], error: str
) -> None:
    response = _post_token(http, emu, **form)

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert emu.stats()["failed"] == emu.stats()["token_requests"] == 1


# -- authorized users (refresh_token) ------------------------------------------------------


def _user_credentials(info: dict[str, str]) -> user_credentials.Credentials:
    # from_authorized_user_info always targets Google's token endpoint, whatever the file says.
    creds: user_credentials.Credentials = user_credentials.Credentials.from_authorized_user_info(info)
    return creds.with_token_uri(info["token_uri"])


def test_authorized_user_refresh(emu: Emulator, tmp_path: Path, google_request: Request) -> None:
    path = tmp_path / "adc.json"
    info = emu.write_authorized_user(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert info["type"] == "authorized_user"
    assert info["token_uri"] == emu.token_uri

    creds = _user_credentials(json.loads(path.read_text()))
    creds.refresh(google_request)

    token_info = emu.validate(creds.token)
    assert token_info is not None
    assert token_info["email"] == info["account"]
    assert token_info["azp"] == info["client_id"]
    assert emu.stats()["by_grant"]["refresh_token"] == 1


@pytest.mark.parametrize("field", ["refresh_token", "client_secret", "client_id"])
def test_authorized_user_with_wrong_secret_is_refused(
    emu: Emulator, google_request: Request, field: str
) -> None:
    info = {**emu.create_authorized_user(), field: "wrong"}
    with pytest.raises(exceptions.RefreshError, match="invalid_grant"):
        _user_credentials(info).refresh(google_request)


# -- metadata server -----------------------------------------------------------------------


def test_compute_engine_credentials(on_gce: Emulator, google_request: Request) -> None:
    creds = compute_engine.Credentials()
    creds.refresh(google_request)

    assert creds.service_account_email == DEFAULT_ACCOUNT_EMAIL
    info = on_gce.validate(creds.token)
    assert info is not None
    assert info["email"] == DEFAULT_ACCOUNT_EMAIL
    assert on_gce.stats()["by_grant"]["metadata"] == 1


def test_compute_engine_credentials_with_scopes(on_gce: Emulator, google_request: Request) -> None:
    creds = compute_engine.Credentials(scopes=["scope-a", "scope-b"])
    creds.refresh(google_request)

    info = on_gce.validate(creds.token)
    assert info is not None
    assert info["scope"] == "scope-a scope-b"


def test_google_auth_default_finds_the_metadata_server(
    on_gce: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, google_request: Request
) -> None:
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file to find first

    creds, project = google.auth.default(request=google_request)

    assert isinstance(creds, compute_engine.Credentials)
    assert project == PROJECT_ID
    creds.refresh(google_request)
    assert on_gce.validate(creds.token) is not None


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/", "computeMetadata/\n"),
        ("/computeMetadata/v1/project/project-id", PROJECT_ID),
        ("/computeMetadata/v1/instance/service-accounts/default/email", DEFAULT_ACCOUNT_EMAIL),
        ("/computeMetadata/v1/universe/universe-domain", "googleapis.com"),
    ],
)
def test_metadata_text_values(emu: Emulator, http: requests.Session, path: str, body: str) -> None:
    response = http.get(emu.url + path, headers=FLAVOR, timeout=10)

    assert response.status_code == 200
    assert response.text == body
    assert response.headers["Metadata-Flavor"] == "Google"


def test_metadata_requires_flavor_header(emu: Emulator, http: requests.Session) -> None:
    response = http.get(emu.url + TOKEN_PATH, timeout=10)

    assert response.status_code == 403
    assert response.headers["Metadata-Flavor"] == "Google"
    assert emu.stats()["token_requests"] == 0


def test_metadata_recursive_account_info(emu: Emulator, http: requests.Session) -> None:
    url = emu.url + "/computeMetadata/v1/instance/service-accounts/default/"
    response = http.get(url, params={"recursive": "true"}, headers=FLAVOR, timeout=10)

    assert response.json() == {"aliases": ["default"], "email": DEFAULT_ACCOUNT_EMAIL, "scopes": SCOPES}


def test_metadata_unknown_path(emu: Emulator, http: requests.Session) -> None:
    response = http.get(emu.url + "/computeMetadata/v1/instance/nothing", headers=FLAVOR, timeout=10)
    assert response.status_code == 404


# -- failure injection and latency ---------------------------------------------------------


@pytest.mark.usefixtures("no_backoff")
def test_fail_next_fails_then_recovers(
    emu: Emulator, sa_info: dict[str, str], google_request: Request
) -> None:
    emu.config.fail_next = 2
    _sa_credentials(sa_info).refresh(google_request)  # google-auth retries the two 500s

    stats = emu.stats()
    assert (stats["token_requests"], stats["failed"], stats["issued"]) == (3, 2, 1)
    assert stats["injected_failures"] == 2
    assert emu.config.fail_next == 0


@pytest.mark.usefixtures("no_backoff")
def test_failure_rate_one_always_fails(
    emu: Emulator, sa_info: dict[str, str], google_request: Request
) -> None:
    emu.config.failure_rate = 1.0
    with pytest.raises(exceptions.RefreshError, match="internal_failure"):
        _sa_credentials(sa_info).refresh(google_request)
    stats = emu.stats()
    assert stats["issued"] == 0
    assert stats["failed"] == stats["token_requests"] == 3  # google-auth's three attempts


def test_latency_delays_refresh(emu: Emulator, sa_info: dict[str, str], google_request: Request) -> None:
    emu.config.latency = 0.3
    started = time.monotonic()
    _sa_credentials(sa_info).refresh(google_request)
    assert time.monotonic() - started >= 0.3


def test_concurrent_requests_overlap_and_are_all_counted(emu: Emulator) -> None:
    emu.config.latency = 0.3
    live_before = emu.stats()["live_tokens"]  # counters reset between tests; live tokens do not
    statuses: list[int] = []

    def fetch() -> None:
        statuses.append(requests.get(emu.url + TOKEN_PATH, headers=FLAVOR, timeout=10).status_code)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert time.monotonic() - started < 1.5  # serially it would take 2.4 s
    assert statuses == [200] * 8
    stats = emu.stats()
    assert stats["token_requests"] == stats["issued"] == stats["live_tokens"] - live_before == 8


# -- stats, config, tokeninfo --------------------------------------------------------------


def test_stats_endpoint_and_reset(emu: Emulator, http: requests.Session) -> None:
    token = http.get(emu.url + TOKEN_PATH, headers=FLAVOR, timeout=10).json()["access_token"]
    stats = http.get(emu.url + "/stats", timeout=10).json()
    assert stats == emu.stats()
    assert stats["by_account"] == {DEFAULT_ACCOUNT_EMAIL: 1}
    assert stats["live_tokens"] >= 1

    reset = http.post(emu.url + "/stats/reset", timeout=10).json()
    assert reset["token_requests"] == reset["issued"] == 0
    assert reset["by_grant"] == {"jwt-bearer": 0, "refresh_token": 0, "metadata": 0}
    assert emu.validate(token) is not None  # resetting counters does not revoke tokens


@pytest.mark.parametrize("status", [429, 403])
def test_rate_limited_failures_with_retry_after(emu: Emulator, http: requests.Session, status: int) -> None:
    """Google's two rate-limited answers, as a token endpoint client sees them, and when they came."""
    emu.config.update({"fail_next": 1, "failure_status": status, "retry_after": 7})
    before = time.time()
    response = http.post(emu.url + "/token", data={"grant_type": JWT_BEARER, "assertion": "x"}, timeout=10)
    assert response.status_code == status
    assert response.headers["Retry-After"] == "7"
    assert response.json() == {"error": "rate_limit_exceeded", "error_description": "Rate Limit Exceeded"}
    (at,) = emu.stats()["request_times"]
    assert before <= at <= time.time()
    emu.config.update({"fail_next": 1, "failure_status": 500, "retry_after": 0})
    plain = http.post(emu.url + "/token", data={"grant_type": JWT_BEARER, "assertion": "x"}, timeout=10)
    assert plain.status_code == 500 and "Retry-After" not in plain.headers
    assert plain.json()["error"] == "internal_failure"


def test_config_endpoint(emu: Emulator, http: requests.Session) -> None:
    assert http.get(emu.url + "/config", timeout=10).json() == EmulatorConfig().as_dict()

    response = http.post(emu.url + "/config", json={"latency": 0.05, "fail_next": 1}, timeout=10)

    assert response.status_code == 200
    assert response.json()["latency"] == 0.05
    assert (emu.config.latency, emu.config.fail_next) == (0.05, 1)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"latency": 0.1, "failure_rate": 2}, "failure_rate"),
        ({"lifetime": "long"}, "lifetime"),
        ({"lifetime": True}, "lifetime"),
        ({"fail_next": -1}, "fail_next"),
        ({"latency": 0.1, "fail_next": 1.5}, "fail_next"),
        ({"failure_status": 200}, "failure_status"),
        ({"retry_after": -1}, "retry_after"),
        ([1, 2], "object"),
    ],
)
def test_config_endpoint_rejects_bad_fields(
    emu: Emulator, http: requests.Session, body: Any, field: str
) -> None:
    response = http.post(emu.url + "/config", json=body, timeout=10)

    assert response.status_code == 400
    assert field in response.json()["error_description"]
    assert emu.config == EmulatorConfig()  # a bad field changes nothing, not even the good ones


def test_config_endpoint_rejects_invalid_json(emu: Emulator, http: requests.Session) -> None:
    response = http.post(emu.url + "/config", data=b"{nope", timeout=10)
    assert response.status_code == 400


def test_config_constructor_validates() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        EmulatorConfig(failure_rate=1.5)


def test_tokeninfo_endpoint(emu: Emulator, http: requests.Session) -> None:
    token = http.get(emu.url + TOKEN_PATH, params={"scopes": "a,b"}, headers=FLAVOR, timeout=10).json()
    response = http.get(emu.url + "/tokeninfo", params={"access_token": token["access_token"]}, timeout=10)

    assert response.status_code == 200
    info = response.json()
    assert info["scope"] == "a b"
    assert info["email"] == DEFAULT_ACCOUNT_EMAIL
    assert 0 < info["expires_in"] <= 3600
    posted = http.post(emu.url + "/tokeninfo", data={"access_token": token["access_token"]}, timeout=10)
    assert posted.json() == info

    unknown = http.get(emu.url + "/tokeninfo", params={"access_token": "ya29.nope"}, timeout=10)
    assert unknown.status_code == 400
    assert unknown.json()["error"] == "invalid_token"
    assert http.get(emu.url + "/tokeninfo", timeout=10).status_code == 400


def test_expired_tokens_are_forgotten(http: requests.Session) -> None:
    now = [1_000_000.0]
    with Emulator(config=EmulatorConfig(lifetime=60), clock=lambda: now[0]) as emu:
        token = http.get(emu.url + TOKEN_PATH, headers=FLAVOR, timeout=10).json()["access_token"]
        info = emu.validate(token)
        assert info is not None
        assert info["expires_in"] == 60

        now[0] += 61

        assert emu.validate(token) is None
        assert http.get(emu.url + "/tokeninfo", params={"access_token": token}, timeout=10).status_code == 400
        assert emu.stats()["live_tokens"] == 0


# -- lifecycle, logging, CLI ---------------------------------------------------------------


def test_unknown_route_and_method(emu: Emulator, http: requests.Session) -> None:
    assert http.get(emu.url + "/nowhere", timeout=10).status_code == 404
    assert http.get(emu.token_uri, timeout=10).status_code == 405


def test_stop_is_idempotent_and_final() -> None:
    emu = Emulator().start()
    emu.stop()
    emu.stop()
    with pytest.raises(RuntimeError):
        emu.start()
    Emulator().stop()  # never started


def test_access_log_is_silent_by_default(emu: Emulator, http: requests.Session, capsys: Any) -> None:
    http.get(emu.url + "/stats", timeout=10)
    assert capsys.readouterr().err == ""


def test_verbose_log_omits_tokens(http: requests.Session, capsys: Any) -> None:
    with Emulator(verbose=True) as emu:
        http.get(emu.url + "/tokeninfo", params={"access_token": "ya29.secret-value"}, timeout=10)
    err = capsys.readouterr().err
    assert '"GET /tokeninfo" 400' in err
    assert "secret-value" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_emulator_writes_keys_and_stops_on_signal(tmp_path: Path, signum: int) -> None:
    code = (
        "from tokencache.testing.emulator import run_emulator;"
        f"run_emulator('127.0.0.1', 0, {str(tmp_path)!r}, 2, 600, 0.0, 0.0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(4)]
        assert lines[-1].startswith("emulator listening on http://127.0.0.1:")
        url = lines[-1].rsplit(" ", 1)[1]
        assert requests.get(url + "/config", timeout=10).json()["lifetime"] == 600

        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["authorized_user.json", "sa-1.json", "sa-2.json"]
    assert all(str(tmp_path / "sa-1.json") in line for line in lines[:1])
    key = json.loads((tmp_path / "sa-2.json").read_text())
    assert key["token_uri"] == url + "/token"
    assert key["client_email"] in lines[1]
