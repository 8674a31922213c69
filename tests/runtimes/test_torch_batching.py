"""TorchServe's dynamic batching in the torch runtime, with real archives served by real processes:
concurrent requests reach the handler as one list, a lone request goes after maxBatchDelay, and a
handler that answers a batch with the wrong number of items fails each request of it (no hang)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from modelfleet.runtimes.contract import RuntimeEnvironment
from modelfleet.runtimes.torch_server import BatchSettings, batch_settings
from tests.runtimes import mar_builder
from tests.runtimes.conftest import TorchServer

DELAY_MS = 1000  # long enough that concurrent requests under a loaded machine still meet in a batch


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TorchServer]]:
    root = tmp_path_factory.mktemp("batching")
    plain, configured = root / "plain", root / "configured"
    plain.mkdir()
    configured.mkdir()
    mar_builder.build_batch_mar(root / "build").rename(plain / "batch.mar")
    mar_builder.build_batch_mar(root / "build-cfg", config={"batchSize": 3, "maxBatchDelay": 50}).rename(
        configured / "batch.mar")
    running = {
        # told as the daemon tells it (runtime.batchSize: 4, runtime.maxBatchDelay: 1s)
        "batch4": TorchServer(plain, root / "batch4.log",
                              contract=RuntimeEnvironment(batch_size=4, max_batch_delay=DELAY_MS)),
        "configured": TorchServer(configured, root / "configured.log"),
    }
    try:
        with ThreadPoolExecutor(len(running)) as pool:
            list(pool.map(lambda server: server.wait(), running.values()))
        yield running
    finally:
        for server in running.values():
            server.stop()


def _post_together(url: str, bodies: list[Any]) -> list[httpx.Response]:
    """One request per body, each from its own connection, released at the same moment."""
    barrier = threading.Barrier(len(bodies))

    def post(body: Any) -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            client.get(url.split("/predictions")[0] + "/ping")  # connected before the barrier
            barrier.wait()
            return client.post(url, json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_concurrent_requests_reach_the_handler_as_one_list(servers: dict[str, TorchServer]) -> None:
    responses = _post_together(f"{servers['batch4'].base}/predictions/batch", [{"n": i} for i in range(4)])
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert len({a["call"] for a in answers}) == 1  # one handler call
    assert {a["batch"] for a in answers} == {4} and sorted(a["index"] for a in answers) == [0, 1, 2, 3]
    # each client got the answer to its own request, with its own request id
    assert [a["body"] for a in answers] == [{"n": i} for i in range(4)]
    assert [a["request_id"] for a in answers] == [r.headers["x-request-id"] for r in responses]
    assert len({a["request_id"] for a in answers}) == 4
    assert answers[0]["context_batch_size"] == 4  # the handler's context says the configured size


def test_more_requests_than_the_batch_size_make_full_batches(servers: dict[str, TorchServer]) -> None:
    responses = _post_together(f"{servers['batch4'].base}/predictions/batch", [{"n": i} for i in range(8)])
    assert [r.status_code for r in responses] == [200] * 8
    answers = [r.json() for r in responses]
    calls = {a["call"] for a in answers}
    assert len(calls) == 2 and {a["batch"] for a in answers} == {4}
    assert [a["body"] for a in answers] == [{"n": i} for i in range(8)]


def test_a_lone_request_is_sent_after_max_batch_delay(servers: dict[str, TorchServer]) -> None:
    started = time.monotonic()
    response = httpx.post(f"{servers['batch4'].base}/predictions/batch", json={"alone": True}, timeout=30)
    waited = time.monotonic() - started
    assert response.status_code == 200 and response.json()["batch"] == 1
    assert waited >= DELAY_MS / 1000 * 0.95  # it waited for company, then went alone (a lower bound only)


def test_a_wrong_number_of_answers_fails_each_request_of_the_batch(servers: dict[str, TorchServer]) -> None:
    url = f"{servers['batch4'].base}/predictions/batch"
    responses = _post_together(url, [{"n": 0}, {"wrong": True}, {"n": 2}, {"n": 3}])
    assert [r.status_code for r in responses] == [503] * 4, [r.text for r in responses]
    for response in responses:
        error = response.json()
        assert error["type"] == "InternalServerException"
        assert "the handler returned 3 answers for a batch of 4 requests" in error["message"]
    # the server goes on serving
    after = _post_together(url, [{"n": i} for i in range(4)])
    assert [r.status_code for r in after] == [200] * 4


def test_describe_reports_the_batch_settings(servers: dict[str, TorchServer]) -> None:
    described = httpx.get(f"{servers['batch4'].base}/models/batch").json()[0]
    assert (described["batchSize"], described["maxBatchDelay"]) == (4, DELAY_MS)


def test_the_archives_model_config_is_used_when_the_manifest_says_nothing(servers: dict[str, TorchServer]) -> None:
    server = servers["configured"]
    described = httpx.get(f"{server.base}/models/batch").json()[0]
    assert (described["batchSize"], described["maxBatchDelay"]) == (3, 50)
    responses = _post_together(f"{server.base}/predictions/batch", [{"n": i} for i in range(3)])
    assert {r.json()["batch"] for r in responses} == {3}
    assert "batchSize 3, maxBatchDelay 50 ms (archive model-config)" in server.log()


def test_batch_settings_precedence_manifest_then_archive_then_torchserve_defaults() -> None:
    assert batch_settings(RuntimeEnvironment(), {}) == BatchSettings(1, 100, "default")
    archive = {"batchSize": 16, "maxBatchDelay": 20}
    assert batch_settings(RuntimeEnvironment(), archive) == BatchSettings(16, 20, "archive model-config")
    told = RuntimeEnvironment(batch_size=4)
    assert batch_settings(told, archive) == BatchSettings(4, 20, "archive model-config + manifest")
    assert batch_settings(RuntimeEnvironment(batch_size=2, max_batch_delay=0), {}).max_delay_ms == 0


@pytest.mark.parametrize("config", [{"batchSize": 0}, {"batchSize": "8"}, {"maxBatchDelay": -1},
                                    {"maxBatchDelay": 20_000}])
def test_a_bad_model_config_in_the_archive_names_the_key(config: dict[str, Any]) -> None:
    from modelfleet.runtimes.torch_server import ArchiveError

    with pytest.raises(ArchiveError, match=f"model-config: {next(iter(config))}="):
        batch_settings(RuntimeEnvironment(), config)


