"""Serverless with ``standby: paused`` on the real pool: the standby is started, waits until ready
and is frozen (docker pause), never routed while paused; the first request thaws that same
container (no new start); idle, it is paused again; switching the mode stops or pauses it in place; a new
version replaces the paused container with a new paused one."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet

SERVERLESS = {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroGrace": "2s", "scaleDownDelay": "2s",
              "activationTimeout": "10s", "standby": "paused"}


def _of(fleet: Fleet, model: str) -> list[dict[str, Any]]:
    return [c for c in fleet.containers() if c["labels"].get("modelfleet.model") == model]


def _only_state(fleet: Fleet, model: str, state: str) -> bool:
    found = _of(fleet, model)
    return len(found) == 1 and found[0]["state"] == state


def _started_at(fleet: Fleet, container_id: str) -> str:
    client = fleet.hosts[0].client(timeout=5)
    try:
        return str(client.api.inspect_container(container_id)["State"]["StartedAt"])
    finally:
        client.close()


def _model(standby: str, version: str = "v1") -> dict[str, Any]:
    model = echo_model("ps", version=version, replicas=0, environment="development")
    deployment = model["spec"]["deployments"][0]
    del deployment["replicas"]
    deployment["serverless"] = {**copy.deepcopy(SERVERLESS), "standby": standby}
    return model


def test_a_paused_standby_is_thawed_by_the_first_request_and_paused_again(
        tmp_path: Path, clean_hosts: list[TestHost]) -> None:
    fleet = make_fleet(tmp_path, clean_hosts[:1])
    fleet.push({**BASE_MANIFESTS, "models/ps.yaml": _model("paused")})
    fleet.start()
    try:
        # At zero: one container, paused (it was started and got ready first), not routed.
        fleet.wait(lambda: fleet.deployment("ps", "development").get("reason") == "ScaledToZero"
                   and _only_state(fleet, "ps", "paused"), 60, "a paused standby")
        fleet.wait(fleet.routed, 10, "gateway follows the table")
        [standby] = _of(fleet, "ps")
        started_before = _started_at(fleet, standby["id"])
        routes = httpx.get(f"http://127.0.0.1:{fleet.gateway_port}/routes", timeout=5, trust_env=False).json()
        assert not routes["routes"].get("ps/development"), routes

        # 1. The first request thaws the same container: answered, and the process was not restarted.
        first = fleet.call("ps", "/infer", environment="development")
        assert first.status_code == 200, (first.status_code, first.text, fleet.log())
        assert _only_state(fleet, "ps", "running")
        [running] = _of(fleet, "ps")
        assert running["id"] == standby["id"]
        assert _started_at(fleet, running["id"]) == started_before  # unpaused, not started again

        # 2. Idle: paused again (not stopped), the same container, out of the routes.
        fleet.wait(lambda: _only_state(fleet, "ps", "paused"), 60, "paused again when idle")
        assert _of(fleet, "ps")[0]["id"] == standby["id"]
        fleet.wait(lambda: fleet.deployment("ps", "development").get("reason") == "ScaledToZero", 20, "standby")
        again = fleet.call("ps", "/infer", environment="development")
        assert again.status_code == 200, (again.status_code, again.text, fleet.log())
        fleet.wait(lambda: _only_state(fleet, "ps", "paused"), 60, "paused again")

        # 3. standby: stopped -> the paused container is stopped in place (not replaced) ...
        fleet.push({**BASE_MANIFESTS, "models/ps.yaml": _model("stopped")}, "stopped standby")
        fleet.wait(lambda: _only_state(fleet, "ps", "exited"), 60, "stopped in place")
        assert _of(fleet, "ps")[0]["id"] == standby["id"]
        cold = fleet.call("ps", "/infer", environment="development")
        assert cold.status_code == 200, (cold.status_code, cold.text, fleet.log())
        fleet.wait(lambda: _only_state(fleet, "ps", "exited"), 60, "stopped again when idle")

        # 4. ... and back to paused: started, ready, frozen, still the same container.
        fleet.push({**BASE_MANIFESTS, "models/ps.yaml": _model("paused")}, "paused standby")
        fleet.wait(lambda: _only_state(fleet, "ps", "paused"), 60, "paused in place")
        assert _of(fleet, "ps")[0]["id"] == standby["id"]
        warm = fleet.call("ps", "/infer", environment="development")
        assert warm.status_code == 200, (warm.status_code, warm.text, fleet.log())
        fleet.wait(lambda: _only_state(fleet, "ps", "paused"), 60, "paused again before the new version")

        # 5. A new version of a paused standby: a new container, paused once ready; the old (paused)
        #    one removed; the next request is answered by the new version.
        fleet.push({**BASE_MANIFESTS, "models/ps.yaml": _model("paused", version="v2")}, "v2")
        fleet.wait(lambda: _only_state(fleet, "ps", "paused") and _of(fleet, "ps")[0]["id"] != standby["id"], 60,
                   "the new version paused, the old one removed")
        v2 = fleet.call("ps", "/infer", environment="development")
        assert v2.status_code == 200 and "v2" in v2.text, (v2.status_code, v2.text, fleet.log())
    finally:
        fleet.stop()
        fleet.kill_gateway()
