"""The test harness itself: real hosts, the echo image, partitions, cleanup of leftovers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import netns_hosts
import pytest
import requests
from netns_hosts import TestHost

pytestmark = pytest.mark.integration


def test_hosts_answer_ping_and_look_like_separate_machines(docker_hosts: list[TestHost]) -> None:
    assert len(docker_hosts) == 3
    ids = set()
    for host in docker_hosts:
        client = host.client(timeout=5)
        assert client.ping()
        info = client.info()
        assert info["Name"] == host.name  # own UTS namespace
        ids.add(info["ID"])  # own key.json, not the machine's /etc/docker/key.json
        tags = {tag for image in client.images.list() for tag in image.tags}
        assert {netns_hosts.BUSYBOX_TAG, netns_hosts.ECHO_TAG} <= tags
    assert len(ids) == 3
    assert len({h.address for h in docker_hosts}) == 3
    assert len({h.docker_url for h in docker_hosts}) == 3


def test_echo_container_answers_from_the_root_namespace(clean_hosts: list[TestHost]) -> None:
    # One container per host, all on the same default bridge subnet inside their namespaces:
    # each must be reached through its own host's published port with its own VERSION.
    bridge_ips = set()
    for host in clean_hosts:
        client = host.client()
        started = time.monotonic()
        container = netns_hosts.run_echo(client, version=f"v-{host.name}")
        url = host.url(netns_hosts.published_port(container))
        body = json.loads(netns_hosts.wait_http(url, timeout=5))
        first_200 = time.monotonic() - started
        assert body["version"] == f"v-{host.name}"
        assert body["host"] == container.id[:12]
        assert first_200 < 2.0, f"start -> first 200 took {first_200:.3f} s"
        bridge_ips.add(container.attrs["NetworkSettings"]["IPAddress"])

        status, raw = netns_hosts.http_get(url + "predict", data=b'{"inputs": "hello"}')
        assert status == 200
        assert json.loads(raw) == {
            "version": f"v-{host.name}",
            "host": container.id[:12],
            "method": "POST",
            "path": "/predict",
            "bytes": 19,
        }
        assert netns_hosts.http_get(url + "ping") == (200, b'{"status": "Healthy"}')
    assert len(bridge_ips) == 1  # same 172.17.0.x everywhere, no clash across namespaces


def test_fail_ready_keeps_ping_failing(clean_hosts: list[TestHost]) -> None:
    host = clean_hosts[0]
    container = netns_hosts.run_echo(host.client(), version="broken", env={"FAIL_READY": "1"})
    url = host.url(netns_hosts.published_port(container))
    netns_hosts.wait_http(url, timeout=5)  # the server is up and serves predictions ...
    for _ in range(5):  # ... but never becomes ready
        assert netns_hosts.http_get(url + "ping") == (500, b'{"status": "Unhealthy"}')
        time.sleep(0.1)


def test_ready_delay_delays_readiness(clean_hosts: list[TestHost]) -> None:
    host = clean_hosts[1]
    container = netns_hosts.run_echo(host.client(), env={"READY_DELAY": "2"})
    url = host.url(netns_hosts.published_port(container))
    netns_hosts.wait_http(url, timeout=5)
    assert netns_hosts.http_get(url + "healthz")[0] == 500
    netns_hosts.wait_http(url + "healthz", timeout=5)


def test_stop_is_fast_without_init(clean_hosts: list[TestHost]) -> None:
    # The echo entrypoint traps SIGTERM: no 10 s wait on `docker stop`.
    container = netns_hosts.run_echo(clean_hosts[0].client())
    netns_hosts.wait_http(clean_hosts[0].url(netns_hosts.published_port(container)), timeout=5)
    started = time.monotonic()
    container.stop(timeout=10)
    assert time.monotonic() - started < 3


def test_partition_times_out_and_heal_restores(clean_hosts: list[TestHost]) -> None:
    host, other = clean_hosts[2], clean_hosts[0]
    container = netns_hosts.run_echo(host.client(), version="vp")
    url = host.url(netns_hosts.published_port(container))
    netns_hosts.wait_http(url, timeout=5)
    client = host.client(timeout=1)
    other_client = other.client(timeout=5)

    host.partition()
    try:
        assert netns_hosts.is_partitioned(host)
        started = time.monotonic()
        with pytest.raises(requests.exceptions.RequestException):
            client.ping()
        # A timeout, like a real partition: not an instant "invalid argument"/"no route".
        assert 0.8 < time.monotonic() - started < 5
        with pytest.raises(OSError):
            netns_hosts.http_get(url, timeout=1)
        assert other_client.ping()  # the rest of the pool is unaffected
    finally:
        host.heal()
    assert not netns_hosts.is_partitioned(host)
    assert client.ping()
    assert json.loads(netns_hosts.wait_http(url, timeout=5))["version"] == "vp"


def test_start_hosts_cleans_leftovers_of_a_killed_run() -> None:
    # Its own prefix/subnet: the session hosts stay untouched.
    prefix = "mfx"
    try:
        (host,) = netns_hosts.start_hosts(1, prefix, subnet_base=None)
    except netns_hosts.HostsBusyError:
        pytest.skip("another session is running this test right now")
    try:
        client = host.client()
        netns_hosts.build_echo_image(client)
        netns_hosts.run_echo(client)
        # What SIGKILL of a whole test run leaves: daemons and shims dead, containers orphaned,
        # mounts still in place, netns/veth/dirs still there.
        for proc in netns_hosts._host_processes(host.netns, host.host_dir):
            if proc.name in ("dockerd", "containerd", "containerd-shim-runc-v2"):
                os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert netns_hosts._mounts_under(host.host_dir)

        (host,) = netns_hosts.start_hosts(1, prefix, subnet_base=None)
        assert host.client().ping()
        assert host.client().containers.list(all=True) == []
    finally:
        netns_hosts.stop_hosts(prefix)
    assert netns_hosts.host_status(prefix) == [
        {"name": "mfx0", "netns": False, "veth": False, "processes": [], "mounts": 0}
    ]
    assert not Path(f"/var/run/netns/{prefix}0").exists()
