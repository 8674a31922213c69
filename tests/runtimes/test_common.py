"""What both runtime servers share: the load -> warm-up -> ready sequence, the health check and
the size-limited body reader (each server's tests check its own HTTP shapes of them)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from modelfleet.runtimes._common import (
    ENV_GC_FREEZE,
    BodyTooLarge,
    ModelThread,
    Phase,
    Readiness,
    WarmupRejected,
    check_health,
    collector_paused,
    load_then_warm,
    process_age,
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


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The test process's collector as it was (enabled, nothing frozen) afterwards."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_paused_while_loading_and_warming_then_what_was_loaded_is_frozen(gc_restored: None) -> None:
    gc.enable()
    gc.unfreeze()
    seen: list[tuple[str, bool]] = []

    def load() -> object:
        seen.append(("load", gc.isenabled()))
        return [object() for _ in range(100)]  # survives: frozen afterwards

    readiness, _ = start(load, lambda _: seen.append(("warm", gc.isenabled())))
    assert seen == [("load", False), ("warm", False)]
    assert readiness.ready and gc.isenabled() and gc.get_freeze_count() >= 100


def test_a_failed_load_turns_the_collector_back_on(gc_restored: None) -> None:
    gc.enable()

    def load() -> object:
        raise OSError("weights are corrupt")

    readiness, _ = start(load, None)
    assert readiness.phase is Phase.FAILED and gc.isenabled()


def test_the_collector_is_left_alone_when_told_or_already_off(gc_restored: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    gc.enable()
    gc.unfreeze()
    monkeypatch.setenv(ENV_GC_FREEZE, "0")
    seen: list[bool] = []
    start(lambda: seen.append(gc.isenabled()), None)
    assert seen == [True] and gc.isenabled() and gc.get_freeze_count() == 0
    # Already off (another load in the same process, or the embedding program's choice): stays off.
    gc.disable()
    with collector_paused(True):
        pass
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_the_startup_steps_and_the_process_age_at_ready_are_recorded() -> None:
    readiness = Readiness()
    thread = ModelThread()

    def load_with_steps() -> object:
        with readiness.startup.step("import things"):
            pass
        with readiness.startup.step("read weights"):
            pass
        return "m"

    try:
        asyncio.run(load_then_warm(thread, readiness, load_with_steps, lambda _: None))
    finally:
        thread.shutdown()
    assert list(readiness.startup.steps) == ["process start to loading", "import things", "read weights", "warm-up"]
    assert readiness.warmup_seconds is not None and readiness.ready_after is not None
    assert readiness.ready_after >= readiness.startup.steps["process start to loading"]
    assert "import things 0.00 s" in readiness.startup.summary()


def test_process_age_counts_from_the_start_of_the_process() -> None:
    code = "import time; time.sleep(0.3); from modelfleet.runtimes._common import process_age; print(process_age())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert float(out.stdout) >= 0.28  # the kernel's start time, not the import of the module
    age = process_age()
    assert age is not None and age > 0


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
