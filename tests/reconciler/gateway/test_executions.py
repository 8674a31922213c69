"""Every execution observable: request ids, one record per request (logged, counted, sent to the daemon)."""

from __future__ import annotations

import io
import json
import logging
import re
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from modelfleet.reconciler.api.executions import execution_routes
from modelfleet.reconciler.daemon.executions import ExecutionJournal
from modelfleet.reconciler.gateway.executions import FLUSH_SLICE, SLICE, ExecutionRecorder, encode_batch
from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.routes import Activation, Backend
from modelfleet.reconciler.logs import ExecutionHandler, JsonFormatter
from tests.http_server import ServerThread, bound_socket
from tests.reconciler.gateway.harness import InBackground, wait_for

pytestmark = pytest.mark.timeout(30)

KEY = "m/production"
TOKEN = "api-t0ken-for-executions"
SPEC = "ab" * 32
REVISION = "cd" * 20


def replica(server: ServerThread, index: int = 1, location: str = "paris-1") -> Backend:
    return Backend(server.url, f"m-production-{index}", "h1", index, SPEC, REVISION, location, "EU")


@pytest.fixture
def daemon_api(servers: list[ServerThread]) -> tuple[Any, ServerThread]:
    """The daemon's real execution endpoints and journal, with a stand-in for the rest of the daemon."""
    daemon: Any = SimpleNamespace(executions=ExecutionJournal(),
                                  status=SimpleNamespace(deployments={("m", "production"): None}),
                                  store=SimpleNamespace(inventory=lambda: []), clients={})
    server = ServerThread.for_app(Starlette(routes=execution_routes(daemon, TOKEN))).start()
    servers.append(server)
    return daemon, server


def logs(api: ServerThread, **params: str) -> dict[str, Any]:
    response = httpx.get(f"{api.url}/api/v1/logs/m", params=params, headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_each_request_gets_an_id_that_reaches_the_replica_and_comes_back(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (replica(a),)})
    made = gw.client.post("/models/m/predict", content=b"x")
    sent = made.json()["headers"]["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", sent), sent
    assert made.headers["x-request-id"] == sent
    assert gw.client.post("/models/m/predict").json()["headers"]["x-request-id"] != sent  # one per request

    kept = gw.client.post("/models/m/predict", headers={"X-Request-Id": "client-id-42"})
    assert kept.json()["headers"]["x-request-id"] == "client-id-42" and kept.headers["x-request-id"] == "client-id-42"
    for bad in ("has space", "x" * 129):
        replaced = gw.client.post("/models/m/predict", headers={"X-Request-Id": bad}).json()["headers"]["x-request-id"]
        assert replaced != bad and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", replaced)


def test_the_daemon_gets_one_record_per_request_with_version_location_and_replica(
        backends: Any, make_gateway: Any, daemon_api: Any) -> None:
    _, a = backends("a")
    daemon, api = daemon_api
    gw = make_gateway({KEY: (replica(a, 3),)}, control_plane=api.url, control_plane_token=TOKEN,
                      gateway_id="gw-1", location="paris-1")
    bodies = [gw.client.post("/models/m/predict?environment=production", content=b"12345",
                             headers={"X-Request-Id": f"req-{i}"}) for i in range(3)]
    assert gw.client.get("/models/nope/predict").status_code == 404  # unknown deployments are not recorded
    wait_for(lambda: daemon.executions.last() >= 3, "three records at the daemon")
    answer = logs(api, environment="production")
    records = answer["executions"]
    assert [r["request_id"] for r in records] == ["req-0", "req-1", "req-2"]
    first = records[0]
    assert (first["model"], first["environment"], first["status"]) == ("m", "production", 200)
    assert (first["host"], first["replica"], first["container"], first["location"]) == \
        ("h1", 3, "m-production-3", "paris-1")
    assert (first["spec_hash"], first["revision"]) == (SPEC, REVISION)
    assert first["response_bytes"] == len(bodies[0].content) and first["request_bytes"] == 5
    assert first["duration_ms"] > 0 and first["gateway"] == "gw-1" and first["gateway_location"] == "paris-1"
    assert not (first["cold_start"] or first["overflow"] or first["retry"])
    assert answer["next"] == records[-1]["seq"]
    assert logs(api, since=str(answer["next"]))["executions"] == []  # what --follow asks next


def test_retries_and_cold_starts_are_marked(backends: Any, make_gateway: Any, daemon_api: Any) -> None:
    _, a = backends("a")
    daemon, api = daemon_api
    dead = bound_socket()  # bound, not listening: connections are refused
    try:
        gone = Backend(f"http://127.0.0.1:{dead.getsockname()[1]}", "gone", "h2", 0, SPEC, REVISION)
        gw = make_gateway({KEY: (gone,), "s/production": ()}, activation={"s/production": Activation(5, 20)},
                          control_plane=api.url, control_plane_token=TOKEN)
        gw.wait_version(gw.publish({KEY: (gone, replica(a)), "s/production": ()}, {"s/production": Activation(5, 20)}))
        retried = [gw.client.post("/models/m/predict", headers={"X-Request-Id": f"r{i}"}) for i in range(4)]
        assert all(r.status_code == 200 for r in retried)
        held = InBackground(gw.url, "POST", "/models/s/predict", content=b"{}", headers={"X-Request-Id": "cold"})
        wait_for(lambda: gw.app.activator.held("s/production"), "the request held")
        gw.publish({KEY: (replica(a),), "s/production": (replica(a, 7),)}, {"s/production": Activation(5, 20)})
        assert held.result().status_code == 200
        wait_for(lambda: daemon.executions.last() >= 5, "five records")
    finally:
        dead.close()
    by_id = {e.request_id: e for _, e in daemon.executions.read("m", None, 0, 100)}
    assert any(by_id[f"r{i}"].retry for i in range(4))  # round-robin sends at least one to the dead one first
    assert all(by_id[f"r{i}"].host == "h1" for i in range(4))  # the replica that answered
    (cold,) = [e for _, e in daemon.executions.read("s", None, 0, 100)]
    assert cold.cold_start and cold.replica == 7 and cold.request_id == "cold"


def test_a_json_log_line_per_request_with_every_field(backends: Any, make_gateway: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (replica(a),)}, gateway_id="gw-json")
    executions = logging.getLogger("modelfleet.executions")
    executions.addHandler(caplog.handler)  # it may not propagate (setup_logging gives it a handler of its own)
    try:
        with caplog.at_level(logging.INFO, logger="modelfleet.executions"):
            gw.client.post("/models/m/predict", headers={"X-Request-Id": "logged-1"})
            wait_for(lambda: any(r.name == "modelfleet.executions" for r in caplog.records), "an execution line")
    finally:
        executions.removeHandler(caplog.handler)
    (record, *_) = [r for r in caplog.records if r.name == "modelfleet.executions"]
    assert "m/production 200" in record.getMessage() and "id=logged-1" in record.getMessage()
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == "modelfleet.executions" and line["request_id"] == "logged-1"
    for name in ("time", "model", "environment", "spec_hash", "revision", "location", "host", "replica", "status",
                 "response_bytes", "duration_ms", "cold_start", "overflow", "retry", "gateway"):
        assert name in line, name
    assert line["replica"] == 1 and line["gateway"] == "gw-json" and line["time"].endswith("Z")


def test_per_version_and_location_metrics(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (replica(a, location="berlin-2"),)})
    for _ in range(2):
        gw.client.post("/models/m/predict")

    def counted() -> bool:
        return ('modelfleet_gateway_executions_total{code="200",environment="production",location="berlin-2",'
                f'model="m",version="{SPEC[:12]}"}} 2.0') in gw.client.get("/metrics").text

    wait_for(counted, "the per-version counter")
    text = gw.client.get("/metrics").text
    assert 'modelfleet_gateway_in_flight_requests{environment="production",model="m"} 0.0' in text
    assert "modelfleet_gateway_execution_duration_seconds_bucket" in text
    # A version no route serves any more loses its series (bounded labels).
    other = Backend(a.url, "m-production-2", "h1", 2, "ef" * 32, REVISION, "berlin-2", "EU")
    gw.wait_version(gw.publish({KEY: (other,)}))
    assert SPEC[:12] not in gw.client.get("/metrics").text


def test_records_wait_for_an_unreachable_daemon_up_to_a_bound_and_say_how_many_were_dropped() -> None:
    recorder = ExecutionRecorder(GatewayMetrics(), gateway_id="g", control_plane="http://127.0.0.1:9",
                                 max_pending=3)
    for i in range(5):
        recorder.record(f"id{i}", "m", "production", 200, 0.01, 0, 2, None, False, False, False)
    recorder.flush()
    assert [r["request_id"] for r in recorder._pending] == ["id2", "id3", "id4"]  # the newest kept
    assert recorder.dropped == 2


def test_a_batch_encoded_in_slices_is_the_same_json() -> None:
    body = {"gateway": "g-w1", "location": None, "dropped": 3}
    for count in (0, 1, SLICE - 1, SLICE, SLICE + 1, 3 * SLICE + 5):
        executions = [{"request_id": f"r-{n}", "status": 200, "model": "m\u00e9", "cold_start": n % 2 == 0}
                      for n in range(count)]
        assert json.loads(encode_batch(body, executions)) == {**body, "executions": executions}
        assert json.loads(encode_batch({}, executions)) == {"executions": executions}


def test_a_flush_of_many_records_writes_every_line_in_order() -> None:
    execution_logger = logging.getLogger("modelfleet.executions")
    saved = (execution_logger.handlers[:], execution_logger.propagate, execution_logger.level)
    stream = io.StringIO()
    execution_logger.handlers = [ExecutionHandler(stream, as_json=False)]  # the batch handler of setup_logging
    execution_logger.setLevel(logging.INFO)
    try:
        recorder = ExecutionRecorder(GatewayMetrics())
        count = 2 * SLICE + FLUSH_SLICE + 5  # written a slice at a time
        for n in range(count):
            recorder.record(f"id-{n}", "m", "production", 200, 0.001, 10, 20, None, False, False, False)
        assert len(recorder.flush()) == count
    finally:
        execution_logger.handlers, execution_logger.propagate, _ = saved
        execution_logger.setLevel(saved[2])
    ids = re.findall(r"id=(id-\d+)", stream.getvalue())
    assert ids == [f"id-{n}" for n in range(count)]
