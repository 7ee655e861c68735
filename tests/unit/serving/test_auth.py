"""The model server's authentication: the SigV4 verifier against requests signed by botocore as a
``sagemaker-runtime`` client signs them, bearer tokens, and the credentials (generated 0600 file,
environment, weak and example secrets refused)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conveyor.serving import auth
from conveyor.serving.auth import AuthFailed, EndpointAuthError, EndpointCredentials, Verifier

KEY_ID, SECRET, TOKEN = "CNVTESTKEY0000000001", "s3cr3t-" + "k" * 33, "t0k3n-" + "b" * 34
CREDS = EndpointCredentials(KEY_ID, SECRET, TOKEN, "test")
URL = "http://127.0.0.1:8090/endpoints/churn/invocations"
BODY = b"42,fibre,71.5\n"


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    for name in (auth.ENV_KEY_ID, auth.ENV_SECRET, auth.ENV_TOKEN):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


def signed(
    secret: str = SECRET, key_id: str = KEY_ID, url: str = URL, body: bytes = BODY, service: str = "sagemaker"
) -> dict[str, str]:
    """The headers botocore sends for an InvokeEndpoint-like request (its signer, region eu-west-1)."""
    request = AWSRequest(
        method="POST", url=url, data=body, headers={"Content-Type": "text/csv", "Accept": "application/json"}
    )
    SigV4Auth(Credentials(key_id, secret), service, "eu-west-1").add_auth(request)
    headers = {name.lower(): value for name, value in request.headers.items()}
    headers["host"] = "127.0.0.1:8090"  # what the HTTP client sends (botocore signs it from the URL)
    return headers


def verify(headers: dict[str, str], body: bytes = BODY, verifier: Verifier | None = None, path: str = "") -> None:
    """Run both checks of the verifier on a request to URL."""
    verifier = verifier or Verifier(CREDS)
    parsed = verifier.check_headers(headers)
    if parsed is not None:
        verifier.check_signature(
            parsed, "POST", path or "/endpoints/churn/invocations", "", list(headers.items()), body
        )


def refused(
    headers: dict[str, str], body: bytes = BODY, verifier: Verifier | None = None, path: str = ""
) -> AuthFailed:
    with pytest.raises(AuthFailed) as failure:
        verify(headers, body, verifier, path)
    return failure.value


# --------------------------------------------------------------------------------------- SigV4


def test_a_botocore_signature_with_the_right_secret_passes():
    verify(signed())


def test_a_wrong_secret_is_refused():
    failure = refused(signed(secret="another-secret-" + "x" * 30))
    assert (failure.status, failure.code) == (403, "InvalidSignatureException")
    assert "signature does not match" in failure.message


def test_a_tampered_body_path_or_signed_header_is_refused():
    assert "does not match" in refused(signed(), body=BODY + b"1").message
    assert "does not match" in refused(signed(), path="/endpoints/other/invocations").message
    headers = signed()
    headers["content-type"] = "application/json"  # signed as text/csv
    assert refused(headers).code == "InvalidSignatureException"
    headers = signed()
    headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"  # no way around the body hash
    assert "UNSIGNED-PAYLOAD is not accepted" in refused(headers).message


def test_a_stale_or_future_date_is_refused():
    headers = signed()
    late = Verifier(CREDS, clock=lambda: time.time() + 301)
    failure = refused(headers, verifier=late)
    assert failure.status == 403 and failure.message.startswith("Signature expired: X-Amz-Date")
    assert "at most 300s" in failure.message
    assert refused(headers, verifier=Verifier(CREDS, clock=lambda: time.time() - 400)).status == 403
    verify(headers, verifier=Verifier(CREDS, clock=lambda: time.time() + 200))  # within the skew


def test_missing_or_malformed_headers():
    failure = refused({"host": "127.0.0.1:8090"})
    assert (failure.status, failure.code) == (401, "MissingAuthenticationTokenException")
    assert "Bearer" in failure.message and "SigV4" in failure.message
    headers = signed()
    del headers["x-amz-date"]
    assert "X-Amz-Date" in refused(headers).message
    headers = signed()
    headers["authorization"] = headers["authorization"].split(", Signature=")[0]
    assert refused(headers).code == "IncompleteSignatureException"
    assert refused({"authorization": "Basic dXNlcjpwYXNz"}).message.startswith("Authorization scheme 'Basic'")
    headers = signed()
    del headers["content-type"]  # signed, then dropped
    assert "signed header(s) content-type are not in the request" in refused(headers).message


def test_an_unknown_key_or_another_service_is_refused():
    failure = refused(signed(key_id="AKIDSOMEONEELSE00001"))
    assert (failure.status, failure.code) == (403, "UnrecognizedClientException")
    assert "'AKIDSOMEONEELSE00001' is not this endpoint's" in failure.message
    assert "service 'execute-api'" in refused(signed(service="execute-api")).message


def test_sigv4_off_when_only_a_token_is_configured():
    only_token = Verifier(EndpointCredentials(None, None, TOKEN, "env"))
    assert "SigV4 is not enabled" in refused(signed(), verifier=only_token).message
    verify({"authorization": f"Bearer {TOKEN}"}, verifier=only_token)


# -------------------------------------------------------------------------------------- bearer


def test_bearer_token_good_and_bad():
    verify({"authorization": f"Bearer {TOKEN}"})
    verify({"authorization": f"bearer  {TOKEN} "})
    failure = refused({"authorization": f"Bearer {TOKEN}x"})
    assert (failure.status, failure.code) == (403, "UnrecognizedClientException")
    assert refused({"authorization": "Bearer "}).status == 403
    no_token = Verifier(EndpointCredentials(KEY_ID, SECRET, None, "env"))
    assert "bearer tokens are not enabled" in refused({"authorization": f"Bearer {TOKEN}"}, verifier=no_token).message


# --------------------------------------------------------------------------------- credentials


def test_the_local_default_generates_0600_credentials_once(state):
    first = auth.endpoint_credentials()
    path = state / "endpoint-credentials.json"
    assert first.source == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.endpoint_credentials() == first  # stable
    document = json.loads(path.read_text())
    assert document["access_key_id"] == first.access_key_id and len(document["secret_access_key"]) >= 40
    assert SECRET not in repr(first) and first.secret_access_key not in repr(first)  # never shown


def test_concurrent_first_starts_agree_on_one_set_of_credentials(state):
    seen: list[EndpointCredentials] = []
    threads = [threading.Thread(target=lambda: seen.append(auth.endpoint_credentials())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({c.secret_access_key for c in seen}) == 1 and len(seen) == 8
    assert [p.name for p in state.iterdir()] == ["endpoint-credentials.json"]  # no temporary file left


def test_the_environment_wins_over_the_file(state, monkeypatch):
    monkeypatch.setenv(auth.ENV_KEY_ID, KEY_ID)
    monkeypatch.setenv(auth.ENV_SECRET, SECRET)
    monkeypatch.setenv(auth.ENV_TOKEN, TOKEN)
    assert auth.endpoint_credentials() == EndpointCredentials(KEY_ID, SECRET, TOKEN, "the environment")
    assert not state.exists()  # nothing generated


@pytest.mark.parametrize(
    "variables, message",
    [
        ({auth.ENV_TOKEN: ""}, "CONVEYOR_ENDPOINT_TOKEN is empty"),
        ({auth.ENV_TOKEN: "change-me-change-me-change-me"}, "CONVEYOR_ENDPOINT_TOKEN is an example value"),
        ({auth.ENV_TOKEN: "short"}, "CONVEYOR_ENDPOINT_TOKEN must be at least 20 characters"),
        ({auth.ENV_KEY_ID: "AKIAIOSFODNN7EXAMPLE", auth.ENV_SECRET: SECRET}, "is an example value"),
        (
            {auth.ENV_KEY_ID: KEY_ID, auth.ENV_SECRET: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
            "CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY is an example value",
        ),
        ({auth.ENV_KEY_ID: KEY_ID}, "CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY is not set"),
        ({auth.ENV_KEY_ID: KEY_ID, auth.ENV_SECRET: ""}, "CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY is empty"),
        ({auth.ENV_KEY_ID: "a/b", auth.ENV_SECRET: SECRET}, "must be 4 to 128 letters or digits"),
    ],
)
def test_weak_or_example_secrets_are_refused(state, monkeypatch, variables, message):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(EndpointAuthError, match=message):
        auth.endpoint_credentials()


def test_a_credentials_file_others_can_read_is_refused(state):
    auth.endpoint_credentials()
    path = state / "endpoint-credentials.json"
    os.chmod(path, 0o644)
    with pytest.raises(EndpointAuthError, match="can be read by others .*chmod 600"):
        auth.endpoint_credentials()
    os.chmod(path, 0o600)
    path.write_text(json.dumps({"access_key_id": KEY_ID, "secret_access_key": "", "token": TOKEN}))
    with pytest.raises(EndpointAuthError, match="secret_access_key is empty"):
        auth.endpoint_credentials()


def test_the_server_refuses_to_start_with_an_example_secret(state, monkeypatch):
    from conveyor.serving.app import create_app

    monkeypatch.setenv(auth.ENV_TOKEN, "changeme")
    with pytest.raises(EndpointAuthError, match="CONVEYOR_ENDPOINT_TOKEN"):
        create_app("ep")


def test_client_headers_are_accepted_by_the_verifier(state):
    credentials = auth.endpoint_credentials()
    verifier = Verifier(credentials)
    url = "http://127.0.0.1:8090/invocations"
    headers = auth.auth_headers("POST", url, BODY, {"Content-Type": "text/csv", "X-Conveyor-Target": "candidate"})
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=" + credentials.access_key_id)
    lower = {name.lower(): value for name, value in headers.items()} | {"host": "127.0.0.1:8090"}
    parsed = verifier.check_headers(lower)
    assert parsed is not None
    verifier.check_signature(parsed, "POST", "/invocations", "", list(lower.items()), BODY)
    bearer = auth.auth_headers("POST", url, BODY, bearer=True)
    assert verifier.check_headers({k.lower(): v for k, v in bearer.items()}) is None
