"""HostClient.artifact_ids: a host's artifact volumes, listed again only when its last list is
older than ``max_age`` or a volume was created or removed through the client meanwhile."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from modelfleet.reconciler.pool.adapter import HostClient
from modelfleet.state.pool import Host

HOST = Host.model_validate({"name": "par-0", "url": "tcp://127.0.0.1:1",
                            "location": {"name": "x", "country": "FR", "continent": "EU"},
                            "flavors": [{"name": "cpu", "type": "cpu"}], "capacity": {"cpus": 2, "memory": "2Gi"}})


class VolumesApi:
    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.calls = 0
        self.during: Any = None  # called in the middle of a list (a concurrent change)

    def volumes(self, filters: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        assert filters == {"label": ["modelfleet.artifact", "modelfleet.managed=true"]}
        listed = list(self.labels)
        if self.during is not None:
            self.during()
        return {"Volumes": [{"Name": f"mf-artifact-{i}", "Labels": {"modelfleet.artifact": label}}
                            for i, label in enumerate(listed)] + [{"Name": "other", "Labels": None}]}


def _client(api: VolumesApi) -> HostClient:
    client = HostClient(HOST)
    client._client = SimpleNamespace(api=api)
    return client


def test_a_fresh_list_is_reused_and_a_change_through_the_client_lists_again() -> None:
    api = VolumesApi(["sha256:aa"])
    client = _client(api)
    assert client.artifact_ids(max_age=30) == {"sha256:aa"}
    api.labels.append("sha256:bb")
    assert client.artifact_ids(max_age=30) == {"sha256:aa"} and api.calls == 1  # reused
    assert client.artifact_ids() == {"sha256:aa", "sha256:bb"} and api.calls == 2  # max_age 0: asks
    client.artifacts_changed()
    api.labels.remove("sha256:aa")
    assert client.artifact_ids(max_age=30) == {"sha256:bb"} and api.calls == 3


def test_a_list_that_a_change_overtook_is_answered_but_not_kept() -> None:
    api = VolumesApi(["sha256:aa"])
    client = _client(api)

    def change() -> None:
        api.labels.append("sha256:bb")
        client.artifacts_changed()

    api.during = change
    assert client.artifact_ids(max_age=30) == {"sha256:aa"}  # what the host said at the time
    api.during = None
    assert client.artifact_ids(max_age=30) == {"sha256:aa", "sha256:bb"} and api.calls == 2

