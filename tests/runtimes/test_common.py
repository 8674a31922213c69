"""What both runtime servers share: the load -> warm-up -> ready sequence, the health check and
the size-limited body reader (each server's tests check its own HTTP shapes of them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from modelfleet.runtimes._common import (
    BodyTooLarge,
    ModelThread,
    Phase,
    Readiness,
    WarmupRejected,
    check_health,
    load_then_warm,
    read_body,
)


def start(load: Callable[[], object], warm: Callable[[object], None] | None,
          timeout: float | None = None) -> tuple[Readiness, ModelThread]:
    readiness, thread = Readiness(), ModelThread(queue_size=1, stuck_seconds=600)
    try:
        asyncio.run(load_then_warm(thread, readiness, load, warm, warmup_timeout=timeout))
    finally:
        thread.shutdown()
    return readiness, thread


def test_ready_only_after_the_warm_up_call_answered_with_what_was_loaded() -> None:
    seen: list[object] = []
    readiness, _ = start(lambda: "the model", seen.append)
    assert seen == ["the model"]
    assert readiness.phase is Phase.READY and readiness.message == "model answers"
    assert readiness.load_seconds is not None


def test_warm_up_disabled_is_ready_once_loaded() -> None:
    readiness, _ = start(lambda: "m", None)
    assert (readiness.phase, readiness.message) == (Phase.READY, "loaded (warm-up disabled)")


def test_a_load_failure_is_failed_and_never_warms_up() -> None:
    warmed: list[object] = []

    def load() -> object:
        raise OSError("weights are corrupt")

    readiness, _ = start(load, warmed.append)
    assert readiness.phase is Phase.FAILED and warmed == []
    assert readiness.message == "loading the model failed: OSError: weights are corrupt"


def test_warm_up_failures_say_why() -> None:
    def crash(_: object) -> None:
        raise RuntimeError("bad shape")

    def reject(_: object) -> None:
        raise WarmupRejected("the warm-up request failed: 400 nope")

    readiness, _ = start(lambda: "m", crash)
    assert (readiness.phase, readiness.message) == (Phase.FAILED, "the warm-up call failed: RuntimeError: bad shape")
    readiness, _ = start(lambda: "m", reject)
    assert (readiness.phase, readiness.message) == (Phase.FAILED, "the warm-up request failed: 400 nope")
    readiness, _ = start(lambda: "m", lambda _: time.sleep(0.5), timeout=0.05)
    assert (readiness.phase, readiness.message) == (Phase.FAILED, "the warm-up call did not answer within 0 s")


def test_health_follows_readiness_and_a_stuck_call() -> None:
    readiness, thread = Readiness(), ModelThread(stuck_seconds=0.01)
    health = check_health(readiness, thread)
    assert not health.healthy and health.phase is Phase.LOADING and health.message == "loading the model"
    readiness.set(Phase.READY, "model answers")
    assert check_health(readiness, thread).healthy

    async def stuck_call() -> None:
        await thread.run(lambda: time.sleep(0.2))

    async def observe() -> None:
        task = asyncio.create_task(stuck_call())
        await asyncio.sleep(0.1)
        health = check_health(readiness, thread)
        assert not health.healthy and health.phase is Phase.READY
        assert health.message == "a model call has been running for more than 0 s"
        await task

    try:
        asyncio.run(observe())
    finally:
        thread.shutdown()
    assert check_health(readiness, thread).healthy


async def _echo_size(request: Request) -> Response:
    try:
        body = await read_body(request, 10)
    except BodyTooLarge as exc:
        return PlainTextResponse(str(exc), 413)
    return PlainTextResponse(str(len(body)))


def _post(content: bytes | AsyncIterator[bytes], headers: dict[str, str] | None = None) -> httpx.Response:
    app = Starlette(routes=[Route("/", _echo_size, methods=["POST"])])

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/", content=content, headers=headers)

    return asyncio.run(go())


@pytest.mark.parametrize("size", [0, 10])
def test_body_within_the_limit(size: int) -> None:
    response = _post(b"x" * size)
    assert (response.status_code, response.text) == (200, str(size))


def test_body_over_the_limit_by_its_declared_length_or_as_it_streams() -> None:
    response = _post(b"x" * 11)
    assert (response.status_code, response.text) == (413, "request larger than 10 bytes")

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to check first
        for _ in range(5):
            yield b"xxx"

    assert _post(chunks()).status_code == 413
