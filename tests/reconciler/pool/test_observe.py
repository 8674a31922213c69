"""observe(): a host that does not answer within its timeout is unreachable for the pass, and the
pass does not wait for it; the other hosts are observed as usual."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from modelfleet.reconciler.errors import HostUnavailable
from modelfleet.reconciler.pool.adapter import ContainerInfo, HostClient
from modelfleet.reconciler.pool.observe import observe
from modelfleet.state.pool import Host


class FakeClient(HostClient):
    """A HostClient whose list answers from a function (no Docker)."""

    def __init__(self, name: str, answer: object, timeout: float = 0.2,
                 held: frozenset[str] | Exception = frozenset()) -> None:
        super().__init__(Host.model_validate({
            "name": name, "url": "tcp://127.0.0.1:1", "location": {"name": "x", "country": "FR", "continent": "EU"},
            "flavors": [{"name": "cpu", "type": "cpu"}], "capacity": {"cpus": 2, "memory": "2Gi"}}), timeout=timeout)
        self.answer = answer
        self.held = held
        self.calls = 0

    def artifact_ids(self, max_age: float = 0.0) -> frozenset[str]:
        if isinstance(self.held, Exception):
            raise self.held
        return self.held

    def list_managed(self) -> list[ContainerInfo]:
        self.calls += 1
        answer = self.answer
        if isinstance(answer, threading.Event):
            answer.wait(30)
            return []
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, list)
        return answer


@pytest.fixture
def hung() -> Iterator[threading.Event]:
    release = threading.Event()
    yield release
    release.set()


def test_a_host_that_does_not_answer_within_its_timeout_is_unreachable_for_the_pass(
        hung: threading.Event) -> None:
    fast = FakeClient("par-0", [])
    slow = FakeClient("vir-2", hung)
    observation = observe([fast, slow])
    assert observation.down_hosts == {"vir-2"}
    assert "host vir-2 is unreachable" in observation.errors["vir-2"]
    assert "docker.timeout" in observation.errors["vir-2"]
    assert "par-0" not in observation.errors
    assert not hung.is_set()  # observe returned while the list was still hanging


def test_a_host_whose_previous_list_has_not_returned_is_not_asked_again(hung: threading.Event) -> None:
    slow = FakeClient("vir-2", hung)
    observe([slow])
    again = observe([slow, FakeClient("par-0", [])])
    assert slow.calls == 1
    assert again.down_hosts == {"vir-2"}
    assert "previous container list has not returned" in again.errors["vir-2"]
    hung.set()
    # Once it returned, the next pass asks it again.
    with slow.listing:
        pass
    slow.answer = []
    assert observe([slow]).down_hosts == frozenset()
    assert slow.calls == 2


def test_answers_and_errors_of_the_other_hosts_are_kept() -> None:
    ok = FakeClient("par-0", [])
    failing = FakeClient("fra-1", HostUnavailable("fra-1", "ConnectionError: refused"))
    observation = observe([ok, failing])
    assert observation.down_hosts == {"fra-1"}
    assert observation.errors == {"fra-1": "host fra-1 is unreachable: ConnectionError: refused"}
    assert set(observation.host_seconds) == {"par-0", "fra-1"}


def test_the_artifacts_each_host_holds_are_observed_and_a_failed_volume_list_only_leaves_them_unknown() -> None:
    warm = FakeClient("par-0", [], held=frozenset({"sha256:" + "a" * 64}))
    odd = FakeClient("par-1", [], held=HostUnavailable("par-1", "volume list refused"))
    down = FakeClient("fra-1", HostUnavailable("fra-1", "ConnectionError: refused"), held=frozenset({"x"}))
    observation = observe([warm, odd, down])
    assert observation.artifacts == {"par-0": frozenset({"sha256:" + "a" * 64})}
    assert observation.down_hosts == {"fra-1"}  # par-1 listed its containers: it is up
