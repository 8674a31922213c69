"""Fixtures for integration tests on real Docker hosts in network namespaces.

The hosts come from dev/netns_hosts.py (see its docstring). They use their own prefix and
subnet so that hosts started by hand with `python dev/netns_hosts.py up` are left alone.

Environment:
    MODELFLEET_REQUIRE_INTEGRATION=1   fail instead of skip when real hosts cannot run (dev/test sets it)
    MODELFLEET_TEST_HOST_PREFIX        prefixes to try, default "mft mfta mftb mftc" (netns mft0..)
    MODELFLEET_TEST_SUBNET_BASE        e.g. "10.232" (host i is 10.232.i.2); default: a free 10.N
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import pytest
from docker.errors import NotFound

# dev/ is not a package: make `import netns_hosts` work for the fixtures and the tests.
_DEV_DIR = Path(__file__).resolve().parents[2] / "dev"
if str(_DEV_DIR) not in sys.path:
    sys.path.append(str(_DEV_DIR))

import netns_hosts  # noqa: E402
from netns_hosts import TestHost  # noqa: E402

HOST_COUNT = 3
# Several sessions may share a machine (a developer's run and the lead's dev/test): each one
# takes the first prefix nobody else holds, and a free subnet.
HOST_PREFIXES = os.environ.get("MODELFLEET_TEST_HOST_PREFIX", "mft mfta mftb mftc").split()
SUBNET_BASE = os.environ.get("MODELFLEET_TEST_SUBNET_BASE") or None
MANAGED_LABEL = "modelfleet.managed=true"
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration, and anything using the hosts, is an integration test.
    for item in items:
        if _HERE in Path(item.path).parents or "docker_hosts" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _prepare(host: TestHost) -> None:
    client = host.client()
    try:
        netns_hosts.import_busybox_image(client)
        netns_hosts.build_echo_image(client)
    finally:
        client.close()


@pytest.fixture(scope="session")
def docker_hosts() -> Iterator[list[TestHost]]:
    """Three real Docker hosts (netns + dockerd each) with the busybox and echo images.

    Started once per session and always torn down, also when tests fail or on Ctrl-C/SIGTERM.
    A SIGKILLed run leaves them behind; the next start_hosts removes those leftovers.
    """
    reason = netns_hosts.check_prerequisites()
    if reason:
        message = f"integration tests need real dockerd hosts: {reason}"
        if os.environ.get("MODELFLEET_REQUIRE_INTEGRATION") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    # SIGTERM (CI cancel, `timeout`) would kill pytest without teardown: make it a Ctrl-C,
    # which pytest turns into an orderly shutdown that runs the finally below.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    prefix = None
    try:
        for candidate in HOST_PREFIXES:
            try:
                hosts = netns_hosts.start_hosts(HOST_COUNT, candidate, SUBNET_BASE)
            except netns_hosts.HostsBusyError:
                continue
            prefix = candidate
            break
        else:
            pytest.fail(f"all test host prefixes are in use by other sessions: {HOST_PREFIXES}")
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            list(pool.map(_prepare, hosts))
        yield hosts
    finally:
        if prefix is not None:
            netns_hosts.stop_hosts(prefix)
        signal.signal(signal.SIGTERM, previous)


def remove_managed_containers(hosts: list[TestHost]) -> None:
    """Force-remove every container labelled modelfleet.managed=true on every host."""
    for host in hosts:
        if netns_hosts.is_partitioned(host):
            netns_hosts.heal(host)  # a test that failed mid-partition must not poison the next
        client = host.client()
        try:
            for container in client.containers.list(all=True, filters={"label": MANAGED_LABEL}):
                # NotFound: removed concurrently (an --rm container, a reconciler under test)
                with contextlib.suppress(NotFound):
                    container.remove(force=True)
        finally:
            client.close()


@pytest.fixture
def clean_hosts(docker_hosts: list[TestHost]) -> Iterator[list[TestHost]]:
    """The session hosts, healed and without managed containers before and after the test."""
    remove_managed_containers(docker_hosts)
    yield docker_hosts
    remove_managed_containers(docker_hosts)
