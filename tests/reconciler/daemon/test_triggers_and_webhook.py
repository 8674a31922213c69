"""Pass triggers coalesce; webhook signatures of GitHub, Gitea and GitLab are checked."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

import pytest

from modelfleet.reconciler.api.app import pushed_branch, verify_webhook
from modelfleet.reconciler.daemon.triggers import TriggerQueue


def test_triggers_during_a_pass_coalesce_into_exactly_one_more() -> None:
    queue = TriggerQueue()
    queue.fire("startup")
    assert queue.wait(0.1) == "startup"
    # A pass runs; meanwhile three triggers arrive.
    for reason in ("watch", "webhook", "poll"):
        queue.fire(reason)
    assert queue.wait(0.1) == "watch"  # the first reason is kept
    assert queue.wait(0.05) is None  # and only one pass was queued


def test_wait_wakes_up_on_a_trigger_from_another_thread() -> None:
    queue = TriggerQueue()
    threading.Timer(0.05, lambda: queue.fire("webhook")).start()
    started = time.monotonic()
    assert queue.wait(5) == "webhook"
    assert time.monotonic() - started < 1


SECRET = "s3cret"
BODY = b'{"ref": "refs/heads/main"}'
GOOD = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(("headers", "ok"), [
    ({"x-hub-signature-256": f"sha256={GOOD}"}, True),
    ({"x-hub-signature-256": "sha256=" + "0" * 64}, False),
    ({"x-hub-signature-256": GOOD}, False),  # without the scheme prefix
    ({"x-gitea-signature": GOOD}, True),
    ({"x-gitea-signature": ("1" if GOOD[0] != "1" else "2") + GOOD[1:]}, False),
    ({"x-gitlab-token": SECRET}, True),
    ({"x-gitlab-token": "guess"}, False),
    ({}, False),
])
def test_webhook_signatures(headers: dict[str, str], ok: bool) -> None:
    assert verify_webhook(headers, BODY, SECRET) is ok


def test_a_signature_for_another_body_is_refused() -> None:
    assert not verify_webhook({"x-hub-signature-256": f"sha256={GOOD}"}, BODY + b" ", SECRET)


@pytest.mark.parametrize(("payload", "branch"), [
    ({"ref": "refs/heads/main"}, "main"),
    ({"ref": "refs/heads/feature/x"}, "feature/x"),
    ({"zen": "ping"}, None),
    ([], None),
])
def test_pushed_branch(payload: object, branch: str | None) -> None:
    assert pushed_branch(payload) == branch
