"""Webhook signatures and the dashboard's ?token=: a wrong, malformed or non-ASCII one is a 401, never a 500."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api, verify_webhook
from modelfleet.reconciler.artifacts.store import ArtifactStore

TOKEN = "api-t0ken"
SECRET = "hook-s3cret"
BODY = b'{"ref": "refs/heads/main"}'
GOOD = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()


@pytest.fixture
def triggers() -> list[str]:
    return []


@pytest.fixture
def client(tmp_path: Path, triggers: list[str]) -> TestClient:
    daemon: Any = SimpleNamespace(
        status=SimpleNamespace(to_json=lambda: {"deployments": [], "hosts": []}, observed_once=True),
        config=SimpleNamespace(repo=SimpleNamespace(branch="main")),
        store=SimpleNamespace(recent_passes=lambda limit: [], recent_actions=lambda limit: []),
        reviews=SimpleNamespace(summaries=lambda: []),
        artifacts=ArtifactStore(tmp_path / "state"))
    return TestClient(make_api(daemon, TOKEN, SECRET, triggers.append), raise_server_exceptions=False)


NON_ASCII = "sha256=" + "é" * 64  # the length of a good one, not ASCII


@pytest.mark.parametrize(("header", "value"), [
    (b"X-Hub-Signature-256", NON_ASCII.encode()),  # UTF-8 on the wire
    (b"X-Hub-Signature-256", b"sha256=" + b"\xff" * 64),  # not even text
    (b"X-Hub-Signature-256", f"sha256={GOOD[:-1]}é".encode()),
    (b"X-Gitea-Signature", ("é" * 64).encode()),
    (b"X-Gitea-Signature", GOOD[:-1].encode() + b"\xe9"),  # latin-1 byte
    (b"X-Gogs-Signature", b"\xc3\xa9" * 32),
    (b"X-Gitlab-Token", "hook-s3crét".encode()),
    (b"X-Hub-Signature-256", b"sha256=zz"),  # malformed: not hex, wrong length
])
def test_a_non_ascii_or_malformed_signature_is_401(client: TestClient, triggers: list[str], header: bytes,
                                                   value: bytes) -> None:
    response = client.post("/webhook", content=BODY, headers={header: value})
    assert response.status_code == 401, response.text
    assert response.json() == {"error": "bad signature"}
    assert triggers == []


@pytest.mark.parametrize(("header", "value"), [
    ("X-Hub-Signature-256", f"sha256={GOOD}"),
    ("X-Gitea-Signature", GOOD),
    ("X-Gitlab-Token", SECRET),
])
def test_a_good_signature_queues_a_pass(client: TestClient, triggers: list[str], header: str, value: str) -> None:
    response = client.post("/webhook", content=BODY, headers={header: value})
    assert response.status_code == 202, response.text
    assert triggers == ["webhook"]


@pytest.mark.parametrize("headers", [
    {"x-hub-signature-256": NON_ASCII},
    {"x-gitea-signature": "é" * 64},
    {"x-gitlab-token": "hook-s3crét"},
    {"x-gitlab-token": "\U0001f511"},  # beyond latin-1: cannot have come from the wire
])
def test_verify_webhook_refuses_non_ascii_signatures(headers: dict[str, str]) -> None:
    assert verify_webhook(headers, BODY, SECRET) is False


def test_a_non_ascii_webhook_secret_still_verifies() -> None:
    secret = "clé-secrète"
    signature = hmac.new(secret.encode(), BODY, hashlib.sha256).hexdigest()
    assert verify_webhook({"x-hub-signature-256": f"sha256={signature}"}, BODY, secret)
    # GitLab sends the token as is: UTF-8 bytes, which the ASGI server hands over decoded as latin-1.
    assert verify_webhook({"x-gitlab-token": secret.encode().decode("latin-1")}, BODY, secret)


@pytest.mark.parametrize("query", [
    {"token": "wrong"},
    {"token": "api-t0ke"},  # a prefix
    {"token": TOKEN + "x"},
    {"token": "api-t0kén"},  # non-ASCII
    {"token": ""},
    {},
])
def test_a_wrong_dashboard_token_is_refused(client: TestClient, query: dict[str, str]) -> None:
    response = client.get("/", params=query)
    assert response.status_code == 401, response.text


def test_a_raw_non_utf8_dashboard_token_is_refused(client: TestClient) -> None:
    assert client.get("/?token=%ff%fe").status_code == 401


def test_the_dashboard_opens_with_the_token_or_the_bearer_header(client: TestClient) -> None:
    assert client.get("/", params={"token": TOKEN}).status_code == 200
    response = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and "<h1>modelfleet</h1>" in response.text
