"""The status outbox against the stand-in forge (which checks the documented request shapes):
writes happen in the background, retried with backoff in order, and the latest state wins."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from modelfleet.reconciler.status import AGGREGATE_CONTEXT, CommitStatus, StatusError, deployment_context
from modelfleet.reconciler.status.forges import GiteaWriter, GitHubWriter, _retry_after
from modelfleet.reconciler.status.outbox import StatusOutbox, queued
from tests.reconciler.daemon.test_reconcile import make_daemon, repo  # noqa: F401 (repo: a fixture)

from .forge_standin import StandInForge

SHA = "3f786850e387550fdab836ed7e6dc881de23001b"
OTHER_SHA = "89e6c98d92887913cadf06b2adb97f26cde4849b"
TOKEN = "tok-9f8e7d6c5b4a"
PROD = deployment_context("production", "sentiment")
DEV = deployment_context("development", "sentiment")
FAST = {"base_delay": 0.01, "max_delay": 0.05}


class GatedForge(StandInForge):
    """A stand-in forge whose handler waits for ``gate`` before answering (while ``gated``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gated = True
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _check(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        if self.gated:
            self.entered.set()
            self.gate.wait(timeout=30)
        return super()._check(method, path, headers, raw)


@pytest.fixture
def forge() -> Iterator[StandInForge]:
    with StandInForge("gitea", TOKEN, "acme/models") as standin:
        yield standin


@pytest.fixture
def gated() -> Iterator[GatedForge]:
    standin = GatedForge("gitea", TOKEN, "acme/models")
    with standin:
        try:
            yield standin
        finally:
            standin.gate.set()


def outbox_for(forge: StandInForge, token: str = TOKEN, **options: Any) -> StatusOutbox:
    writer = GiteaWriter(forge.url, forge.target, token, attempts=1, timeout=5.0)
    return StatusOutbox(writer, **{**FAST, **options})


def sent(forge: StandInForge) -> list[tuple[str, str, str]]:
    """(sha, context, state) of each request, in the order the forge got them."""
    return [(r.sha, r.body["context"], r.body["state"]) for r in forge.requests]


def counter(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("modelfleet_status_writes_total", {"result": result}) or 0.0


def test_publish_returns_while_the_forge_has_not_answered(gated: GatedForge) -> None:
    outbox = outbox_for(gated)
    try:
        outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])
        # The forge is holding the request (it waits for the gate nobody has opened): publish is back.
        assert gated.entered.wait(timeout=10)
        assert not gated.gate.is_set()
        assert outbox.pending == 1
        gated.gate.set()
        assert outbox.flush(timeout=10)
        assert sent(gated) == [(SHA, PROD, "success")]
        assert gated.violations == []
    finally:
        outbox.close(timeout=1)


def test_unavailable_then_rate_limited_then_written_in_order(forge: StandInForge) -> None:
    forge.script.extend([(503, {"message": "maintenance"}), (429, {"message": "API rate limit exceeded"})])
    forge.reply_headers[429] = {"Retry-After": "1"}
    registry = CollectorRegistry()
    outbox = outbox_for(forge, registry=registry)
    waits: list[float | None] = []
    original = outbox._failed

    def watch(*args: Any) -> None:  # the delay the outbox chose after each failure
        original(*args)
        waits.append(outbox.to_json()["nextAttemptIn"])

    outbox._failed = watch  # type: ignore[method-assign,assignment]
    try:
        outbox.publish(SHA, [CommitStatus(AGGREGATE_CONTEXT, "pending", "deploying"),
                             CommitStatus(PROD, "pending", "rolling out")])
        outbox.publish(SHA, [CommitStatus(DEV, "success", "ready")])
        assert outbox.flush(timeout=15)
    finally:
        outbox.close(timeout=1)

    # The head was retried until written; the others waited their turn behind it.
    assert sent(forge) == [(SHA, AGGREGATE_CONTEXT, "pending")] * 3 + [(SHA, PROD, "pending"), (SHA, DEV, "success")]
    assert forge.violations == []
    # Backoff after the 503 is the small base delay; after the 429 it is the forge's Retry-After.
    assert len(waits) == 2 and waits[0] is not None and waits[0] < 0.5
    assert waits[1] is not None and waits[1] >= 0.8
    assert (counter(registry, "retried"), counter(registry, "written")) == (2, 3)
    state = outbox.to_json()
    assert state["pending"] == 0 and state["retryingSince"] is None
    assert "HTTP 429" in state["lastError"] and "rate limit" in state["lastError"]
    assert TOKEN not in str(state)


def test_the_latest_state_per_context_wins(gated: GatedForge) -> None:
    registry = CollectorRegistry()
    outbox = outbox_for(gated, registry=registry)
    try:
        outbox.publish(SHA, [CommitStatus(PROD, "pending", "rolling out")])
        assert gated.entered.wait(timeout=10)  # the first write is in flight
        outbox.publish(SHA, [CommitStatus(PROD, "success", "ready"), CommitStatus(DEV, "pending", "rolling out")])
        outbox.publish(SHA, [CommitStatus(PROD, "error", "replica 0 does not answer")])  # supersedes 'success'
        outbox.publish(OTHER_SHA, [CommitStatus(PROD, "pending", "rolling out")])  # another commit: its own key
        assert outbox.pending == 3
        gated.gate.set()
        assert outbox.flush(timeout=10)
    finally:
        outbox.close(timeout=1)
    assert sent(gated) == [(SHA, PROD, "pending"), (SHA, PROD, "error"), (SHA, DEV, "pending"),
                           (OTHER_SHA, PROD, "pending")]
    assert counter(registry, "superseded") == 1


def test_a_failed_write_superseded_meanwhile_is_not_retried(gated: GatedForge) -> None:
    gated.script.append((503, {"message": "maintenance"}))
    outbox = outbox_for(gated)
    try:
        outbox.publish(SHA, [CommitStatus(PROD, "pending", "rolling out")])
        assert gated.entered.wait(timeout=10)
        outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])
        gated.gate.set()  # the in-flight 'pending' fails with 503
        assert outbox.flush(timeout=10)
    finally:
        outbox.close(timeout=1)
    assert sent(gated) == [(SHA, PROD, "pending"), (SHA, PROD, "success")]


def test_a_state_already_written_is_not_written_again(forge: StandInForge) -> None:
    outbox = outbox_for(forge)
    try:
        outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])
        assert outbox.flush(timeout=10)
        outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])
        assert outbox.pending == 0
        outbox.publish(SHA, [CommitStatus(PROD, "success", "ready on 2 hosts")])  # the description changed
        assert outbox.flush(timeout=10)
    finally:
        outbox.close(timeout=1)
    assert [r.body["description"] for r in forge.requests] == ["ready", "ready on 2 hosts"]


def test_a_refused_status_is_dropped_and_queued_again_by_the_next_publish(
        forge: StandInForge, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-token-0123456789"
    registry = CollectorRegistry()
    outbox = outbox_for(forge, token=wrong, registry=registry)
    try:
        with caplog.at_level(logging.DEBUG, logger="modelfleet"):
            outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])
            assert outbox.flush(timeout=10)
            assert len(forge.requests) == 1  # 401: not retried
            assert counter(registry, "failed") == 1 and outbox.to_json()["retryingSince"] is None
            outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])  # the next pass wants it again
            assert outbox.flush(timeout=10)
            assert len(forge.requests) == 2
    finally:
        outbox.close(timeout=1)
    assert "HTTP 401" in (outbox.last_error or "")
    assert wrong not in caplog.text and wrong not in str(outbox.to_json())


def test_the_queue_is_bounded_dropping_the_oldest(gated: GatedForge) -> None:
    registry = CollectorRegistry()
    outbox = outbox_for(gated, max_pending=2, registry=registry)
    try:
        outbox.publish(SHA, [CommitStatus(AGGREGATE_CONTEXT, "pending", "deploying")])
        assert gated.entered.wait(timeout=10)
        outbox.publish(SHA, [CommitStatus(PROD, "pending", "a"), CommitStatus(DEV, "pending", "b")])
        assert outbox.pending == 2 and counter(registry, "dropped") == 1
        assert registry.get_sample_value("modelfleet_status_pending") == 2
        gated.gate.set()
        assert outbox.flush(timeout=10)
    finally:
        outbox.close(timeout=1)
    # The in-flight head was the one dropped from the queue: it was still written once.
    assert [c for _, c, _ in sent(gated)] == [AGGREGATE_CONTEXT, PROD, DEV]


class Failing:
    """A writer that always fails transiently, asking to wait ``retry_after`` seconds."""

    def __init__(self, retry_after: float | None) -> None:
        self.retry_after = retry_after
        self.calls = 0
        self.called = threading.Event()

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        self.calls += 1
        self.called.set()
        raise StatusError("gitea: HTTP 503 Service Unavailable", retry_after=self.retry_after)


@pytest.mark.parametrize(("failures", "retry_after", "expected"), [
    (1, None, 2.0), (3, None, 8.0), (12, None, 60.0),  # doubling, capped at max_delay
    (1, 30.0, 30.0),  # the forge's Retry-After when longer than the backoff
    (1, 10_000.0, 900.0),  # but not beyond max_retry_after
])
def test_backoff_doubles_is_capped_and_honours_retry_after(failures: int, retry_after: float | None,
                                                          expected: float) -> None:
    now = [100.0]
    outbox = StatusOutbox(Failing(retry_after), base_delay=2.0, max_delay=60.0, clock=lambda: now[0],
                          jitter=lambda: 0.5)  # 0.5: no jitter (0.8 + 0.4 * 0.5 == 1)
    outbox._failures = failures - 1
    outbox._failed((SHA, PROD), outbox_entry(), "HTTP 503", True, retry_after)
    assert outbox.to_json()["nextAttemptIn"] == pytest.approx(expected)


def outbox_entry() -> Any:
    from modelfleet.reconciler.status.outbox import _Entry

    return _Entry(SHA, CommitStatus(PROD, "success", "ready"))


def test_shutdown_does_not_wait_out_a_long_retry_after() -> None:
    writer = Failing(retry_after=600.0)
    outbox = StatusOutbox(writer)
    outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])
    assert writer.called.wait(timeout=10)
    outbox.close(timeout=0.2)
    assert outbox._thread is not None and not outbox._thread.is_alive()
    assert writer.calls == 1 and outbox.pending == 1
    outbox.publish(SHA, [CommitStatus(DEV, "success", "ready")])  # closed: ignored
    assert outbox.pending == 1


def test_github_rate_limit_headers_are_a_transient_retry_after() -> None:
    reset = 4_000_000_000  # far in the future
    limited = httpx.Response(403, headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)})
    assert (_retry_after(limited) or 0) > 3600
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "7"})) == 7
    assert _retry_after(httpx.Response(403)) is None  # a permission problem, not a rate limit
    with StandInForge("github", TOKEN, "acme/models") as forge:
        forge.script.append((403, {"message": "API rate limit exceeded"}))
        forge.reply_headers[403] = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
        writer = GitHubWriter(forge.url, forge.target, TOKEN, attempts=1)
        with pytest.raises(StatusError) as failure:
            writer.publish(SHA, [CommitStatus(PROD, "success", "ready")])
        assert failure.value.transient and (failure.value.retry_after or 0) > 3600
        with pytest.raises(StatusError) as refused:
            GitHubWriter(forge.url, forge.target, "bad-token", attempts=1).publish(
                SHA, [CommitStatus(PROD, "success", "ready")])
        assert not refused.value.transient


def test_only_forge_writers_are_queued_and_their_own_retries_are_off(forge: StandInForge) -> None:
    assert queued(None) is None
    plain = Failing(None)
    assert queued(plain) is plain
    writer = GiteaWriter(forge.url, forge.target, TOKEN)
    outbox = queued(writer)
    assert isinstance(outbox, StatusOutbox) and outbox.writer is writer and writer.attempts == 1


def test_a_daemon_pass_enqueues_and_shows_the_writer_state(
        tmp_path: Path, repo: tuple[Path, str], gated: GatedForge) -> None:  # noqa: F811
    work, head = repo
    daemon, _ = make_daemon(tmp_path, work)
    outbox = outbox_for(gated)
    daemon.status_writer = outbox
    daemon.status.status_outbox = outbox
    try:
        daemon.reconcile("test")
        # The pass is over while the forge still holds the first status write.
        assert daemon.status.last_pass["result"] is not None
        assert gated.entered.wait(timeout=10) and not gated.gate.is_set()
        shown = daemon.status.to_json()["statusWriter"]
        assert shown["pending"] >= 1 and shown["lastError"] is None
        gated.gate.set()
        assert outbox.flush(timeout=10)
        contexts = {context: state for sha, context, state in sent(gated) if sha == head}
        assert contexts[AGGREGATE_CONTEXT] in ("failure", "error", "success", "pending")
        assert deployment_context("production", "echo") in contexts
        assert daemon.status.to_json()["statusWriter"]["pending"] == 0
        assert gated.violations == []
    finally:
        outbox.close(timeout=1)
        daemon.close()


def test_a_status_refused_before_sending_does_not_hold_up_the_queue(forge: StandInForge) -> None:
    outbox = outbox_for(forge)
    try:
        outbox.publish("main", [CommitStatus(PROD, "success", "ready")])  # not a commit SHA: refused locally
        outbox.publish(SHA, [CommitStatus(PROD, "success", "ready")])
        assert outbox.flush(timeout=10)
    finally:
        outbox.close(timeout=1)
    assert sent(forge) == [(SHA, PROD, "success")]
    assert "not a full commit SHA" in (outbox.last_error or "") and outbox.to_json()["retryingSince"] is None
