"""Real Docker hosts in network namespaces, for integration tests and local demos.

Each host is a network namespace joined to the root namespace by a veth pair on a private /24
(root side .1, namespace side .2), with its own containerd and dockerd listening on
``tcp://<ns-address>:2375``. Seen from the root namespace (where the tests and the reconciler
run) it is a separate machine on the network; taking the veth down is a network partition.

Usable as a module (``start_hosts``/``stop_hosts``/``import_busybox_image``/``build_echo_image``)
and as a script::

    python dev/netns_hosts.py up [--count N]     # start hosts + import test images, leave running
    python dev/netns_hosts.py status
    python dev/netns_hosts.py down

Needs root and the Debian packages docker.io, iproute2, busybox-static (util-linux for nsenter).
No registry is used: the test images are built from the host's static busybox.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import http.client
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
from docker.models.containers import Container

BASE_DIR = Path("/var/lib/modelfleet-test")
DOCKER_PORT = 2375
BUSYBOX_TAG = "modelfleet/busybox:latest"
ECHO_TAG = "modelfleet/echo:latest"
ECHO_DIGEST_LABEL = "modelfleet.test-echo-digest"
ECHO_PORT = 8080
# Labels put on the test images so that they can be told apart from anything else.
IMAGE_LABEL = "modelfleet.test-image"

# Binaries the harness needs on the machine; checked up front for a clear error.
REQUIRED_BINARIES = ("ip", "nsenter", "dockerd", "containerd", "containerd-shim-runc-v2", "runc")
# Process names (comm / argv[0] basename) that belong to a host when they mention its paths.
_HOST_PROCESS_NAMES = frozenset(
    {"dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "docker-proxy", "nsenter"}
)


class HarnessError(RuntimeError):
    """A test host could not be set up or torn down."""


class HostStartError(HarnessError):
    """A dockerd did not come up in time; the message carries the tail of its log."""


@dataclass
class TestHost:
    """One Docker host in its own network namespace."""

    __test__: ClassVar[bool] = False  # not a pytest test class despite the name

    name: str
    netns: str
    address: str  # the namespace side of the veth; what the rest of the world talks to
    docker_url: str  # tcp://<address>:2375
    data_root: Path
    pid: int  # dockerd
    index: int = 0
    veth: str = ""  # root side of the veth pair; down = partitioned
    gateway: str = ""  # root side address, as seen from inside the namespace
    host_dir: Path = field(default_factory=Path)
    exec_root: Path = field(default_factory=Path)
    log_path: Path = field(default_factory=Path)
    containerd_pid: int = 0

    def client(self, timeout: float = 30.0, version: str = "auto") -> docker.DockerClient:
        """A docker-py client for this host (auto-negotiated API version: one round trip)."""
        return docker.DockerClient(base_url=self.docker_url, timeout=timeout, version=version)

    def url(self, port: int, path: str = "/") -> str:
        """HTTP URL of a port published on this host."""
        return f"http://{self.address}:{port}{path}"

    def partition(self) -> None:
        partition(self)

    def heal(self) -> None:
        heal(self)

    @property
    def subnet(self) -> str:
        return self.address.rsplit(".", 1)[0] + ".0/24"


# --------------------------------------------------------------------------- small helpers


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", *args, check=check)


def _host_dirs(base_dir: Path, name: str) -> tuple[Path, Path, Path]:
    host_dir = base_dir / name
    return host_dir, host_dir / "data", host_dir / "exec"


def _host_net(subnet_base: str, index: int) -> tuple[str, str, str]:
    """(root side address, namespace side address, network) of host number ``index``."""
    return f"{subnet_base}.{index}.1", f"{subnet_base}.{index}.2", f"{subnet_base}.{index}.0/24"


def check_prerequisites() -> str | None:
    """Why real hosts cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, dockerd)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing binaries: {', '.join(missing)} (apt-get install docker.io iproute2 util-linux)"
    try:
        find_static_busybox()
    except HarnessError as exc:
        return str(exc)
    return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    # containerd's grpc "[core]" chatter drowns the interesting lines.
    useful = [line for line in text if "[core]" not in line]
    return "\n".join(useful[-lines:])


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    name: str
    cmdline: str
    netns: tuple[int, int]
    mntns: tuple[int, int]


def _ns(pid: int | str, kind: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{kind}")
    return (st.st_dev, st.st_ino)


def _processes() -> list[_Proc]:
    me = os.getpid()
    procs = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            if not raw:  # kernel thread or zombie
                continue
            argv = raw.rstrip(b"\0").split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            procs.append(
                _Proc(
                    pid=pid,
                    ppid=ppid,
                    name=os.path.basename(argv[0].decode(errors="replace")),
                    cmdline=b" ".join(argv).decode(errors="replace"),
                    netns=_ns(pid, "net"),
                    mntns=_ns(pid, "mnt"),
                )
            )
        except (OSError, IndexError, ValueError):
            continue  # raced with the process exiting
    return procs


def _netns_id(netns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/var/run/netns/{netns}")
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _root_mount_under(pid: int, prefix: str) -> bool:
    """True when the process's "/" is an overlay whose layers live under ``prefix``: a container
    process of that host (readlink /proc/PID/root says just "/" after pivot_root)."""
    try:
        with open(f"/proc/{pid}/mountinfo") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/":
                    return prefix in line
    except OSError:  # ENOENT/ESRCH/EINVAL while the process exits
        pass
    return False


def _host_processes(netns: str, host_dir: Path) -> list[_Proc]:
    """Every process that belongs to a host, found without trusting any pidfile.

    A process belongs to the host when it lives in the host's network namespace (dockerd,
    containerd, shims, docker-proxy, host-network containers), when it is a docker/containerd
    binary naming the host's directories (daemons left in a namespace that an aborted run
    already deleted), when its root filesystem is one of the host's overlays (container
    processes, even orphaned ones whose shim died), or when it descends from any of those.
    """
    ns_id = _netns_id(netns)
    prefix = str(host_dir) + "/"
    my_mntns = _ns("self", "mnt")
    procs = _processes()
    mine = {
        p.pid
        for p in procs
        if (ns_id is not None and p.netns == ns_id)
        or (p.name in _HOST_PROCESS_NAMES and prefix in p.cmdline)
        or (p.mntns != my_mntns and _root_mount_under(p.pid, prefix))
    }
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(mine)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in mine:
                mine.add(child)
                todo.append(child)
    return [p for p in procs if p.pid in mine]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead for our purposes


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_dead(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait for the processes to exit; returns those still alive after ``timeout``."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        for pid in pending:  # reap our own children so that they don't linger as zombies
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        pending = [pid for pid in pending if _alive(pid)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return pending


# --------------------------------------------------------------------------- mounts

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            # field 5 is the mount point, octal-escaped (\040 for a space)
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def _unmount_all(path: Path) -> None:
    """Lazily unmount everything under ``path``: overlays, shm, netns bind mounts, and the
    private bind mount dockerd puts on its data root (left behind when dockerd is killed)."""
    for _ in range(20):  # stacked mounts on one point need several rounds
        points = _mounts_under(path)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):  # deepest first
            if _libc.umount2(point.encode(), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (22, 2):  # EINVAL: not a mount point (any more); ENOENT: gone
                    raise HarnessError(f"umount {point}: {os.strerror(err)}")
    raise HarnessError(f"mounts left under {path}: {_mounts_under(path)}")


# --------------------------------------------------------------------------- teardown


def _teardown_host(name: str, base_dir: Path, keep_log: bool = True) -> None:
    """Remove every trace of one host; tolerates any partial state of an earlier run."""
    host_dir, _data_root, _exec_root = _host_dirs(base_dir, name)
    procs = _host_processes(name, host_dir)
    # Containers first, with SIGKILL: dockerd would otherwise give each one its stop timeout.
    # (Their processes are in another mount namespace; daemons and shims are in ours.)
    my_mntns = _ns("self", "mnt")
    containers = [p.pid for p in procs if p.mntns != my_mntns]
    _signal(containers, signal.SIGKILL)
    _wait_dead(containers, 5)
    # Then dockerd, politely so that it releases its mounts, and only then containerd:
    # a dockerd whose containerd is gone retries forever instead of exiting.
    for daemon in ("dockerd", "containerd"):
        pids = [p.pid for p in procs if p.name == daemon]
        _signal(pids, signal.SIGTERM)
        _signal(_wait_dead(pids, 10), signal.SIGKILL)
    # Whatever is left (shims, docker-proxy, strays in the namespace) gets no say.
    leftovers = [p.pid for p in _host_processes(name, host_dir)]
    _signal(leftovers, signal.SIGKILL)
    if still := _wait_dead(leftovers, 5):
        raise HarnessError(f"{name}: processes survive SIGKILL: {still}")

    if host_dir.exists():
        _unmount_all(host_dir)
        for child in host_dir.iterdir():
            if keep_log and child.name in ("dockerd.log", "containerd.log"):
                continue  # kept for post-mortems; overwritten by the next start
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        if not keep_log:
            host_dir.rmdir()

    _ip("link", "del", f"{name}s", check=False)  # partition sink, see partition()
    # Deleting the root end removes the pair synchronously; netns destruction alone is async.
    _ip("link", "del", f"{name}r", check=False)
    if Path(f"/var/run/netns/{name}").exists():
        _ip("netns", "del", name)


def _names_with_prefix(prefix: str, base_dir: Path) -> list[str]:
    """Hosts with this prefix that left any trace: netns, veths, dirs, processes."""
    pattern = re.compile(rf"^({re.escape(prefix)}\d+)[rst]?$")
    found: set[str] = set()

    def add(candidate: str) -> None:
        if m := pattern.match(candidate):
            found.add(m.group(1))

    for line in _ip("netns", "list", check=False).stdout.splitlines():
        add(line.split()[0] if line.split() else "")
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            add(parts[1].strip().split("@")[0])
    if base_dir.is_dir():
        for child in base_dir.iterdir():
            add(child.name)
    # dockerds of a namespace deleted under their feet are found by their paths.
    marker = re.compile(rf"{re.escape(str(base_dir))}/({re.escape(prefix)}\d+)/")
    for proc in _processes():
        if proc.name in _HOST_PROCESS_NAMES and (m := marker.search(proc.cmdline)):
            add(m.group(1))
    return sorted(found)


def stop_hosts(prefix: str = "mfh", base_dir: Path = BASE_DIR, keep_logs: bool = True) -> list[str]:
    """Stop and remove every host named ``{prefix}{i}``: processes, mounts, dirs, veths, netns.

    Idempotent; also cleans the leftovers of an aborted run. Returns the names cleaned.
    Refuses (HostsBusyError) when another live process started these hosts and still runs.
    """
    _lock_prefix(prefix, base_dir)
    try:
        return _remove_hosts(prefix, base_dir, keep_logs)
    finally:
        _unlock_prefix(prefix)


def _remove_hosts(prefix: str, base_dir: Path, keep_logs: bool) -> list[str]:
    names = _names_with_prefix(prefix, base_dir)
    errors = []

    def teardown(name: str) -> None:
        try:
            _teardown_host(name, base_dir, keep_logs)
        except HarnessError as exc:  # keep going: clean as much as possible
            errors.append(str(exc))

    # In parallel: a host whose dockerd hangs costs its timeouts once, not once per host.
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
        list(pool.map(teardown, names))
    for child in _CHILDREN.pop(prefix, []):
        with contextlib.suppress(Exception):
            child.wait(timeout=1)
    if errors:
        raise HarnessError("; ".join(errors))
    return names


# --------------------------------------------------------------------------- locks

# flock()s: a live session holds its prefix's lock; the kernel drops it when the session dies
# (even by SIGKILL), which is what tells leftovers (to be cleaned) from hosts in use.
_LOCKS: dict[str, int] = {}


class HostsBusyError(HarnessError):
    """Hosts with this prefix belong to another live process."""


def _flock(path: Path, blocking: bool) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_prefix(prefix: str, base_dir: Path) -> None:
    if prefix in _LOCKS:
        return
    path = base_dir / ".locks" / f"{prefix}.lock"
    fd = _flock(path, blocking=False)
    if fd is None:
        owner = path.read_text().strip() or "?"
        raise HostsBusyError(f"test hosts {prefix}* are in use by another process (pid {owner})")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[prefix] = fd


def _unlock_prefix(prefix: str) -> None:
    fd = _LOCKS.pop(prefix, None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


# --------------------------------------------------------------------------- start

# Popen objects of the daemons we started, kept to reap them (no zombies) on stop.
_CHILDREN: dict[str, list[subprocess.Popen[bytes]]] = {}

_CONTAINERD_TOML = """\
version = 2
root = "{data_root}/containerd"
state = "{exec_root}/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{exec_root}/containerd/containerd.sock"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""
"""


def _setup_network(name: str, veth: str, root_addr: str, ns_addr: str) -> None:
    _ip("netns", "add", name)
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    _ip("addr", "add", f"{root_addr}/24", "dev", veth)
    _ip("link", "set", veth, "up")
    # nsenter rather than `ip -n`, which also sets up a mount namespace (and fails where "/"
    # is not a mount point, e.g. in a chroot).
    in_ns = ("nsenter", f"--net=/var/run/netns/{name}", "ip")
    _run(*in_ns, "addr", "add", f"{ns_addr}/24", "dev", "eth0")
    _run(*in_ns, "link", "set", "lo", "up")
    _run(*in_ns, "link", "set", "eth0", "up")
    _run(*in_ns, "route", "add", "default", "via", root_addr)


def _spawn(netns: str, argv: list[str], log: Path, hostname: str | None = None) -> subprocess.Popen[bytes]:
    # nsenter --net only switches the network namespace: `ip netns exec` would also remount
    # /sys in a new mount namespace, which hides the cgroup mounts from dockerd.
    # A new session keeps the daemons alive across Ctrl-C of the test run (stop_hosts ends them).
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{netns}", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: _set_own_hostname(hostname)) if hostname else None,
        )


_CLONE_NEWUTS = 0x04000000


def _set_own_hostname(hostname: str) -> None:
    """In the child before exec: a UTS namespace of its own, so that `docker info` names the
    host like a separate machine instead of repeating this machine's hostname."""
    name = hostname.encode()
    if _libc.unshare(_CLONE_NEWUTS) != 0 or _libc.sethostname(name, len(name)) != 0:
        raise OSError(ctypes.get_errno(), f"unshare/sethostname {hostname}")


def _start_daemons(host: TestHost, data_size: str | None = None) -> list[subprocess.Popen[bytes]]:
    containerd_dir = host.exec_root / "containerd"
    containerd_dir.mkdir(parents=True)
    host.data_root.mkdir(parents=True)
    if data_size is not None:
        # A host with a small disk: images, containers and volumes share one tmpfs of this size,
        # so that a write beyond it fails with ENOSPC as on a full disk (teardown unmounts it).
        _run("mount", "-t", "tmpfs", "-o", f"size={data_size},mode=0711", "tmpfs", str(host.data_root))
    config = containerd_dir / "containerd.toml"
    config.write_text(_CONTAINERD_TOML.format(data_root=host.data_root, exec_root=host.exec_root))
    # An own containerd per host: dockerd would silently share the system one whenever
    # /run/containerd/containerd.sock exists (e.g. docker.io's service on a fresh CI machine).
    containerd = _spawn(host.netns, ["containerd", "--config", str(config)], host.host_dir / "containerd.log")
    # An own daemon.json so that /etc/docker/daemon.json of the machine cannot interfere, and
    # an own key: the engine ID (`docker info` ID) comes from /etc/docker/key.json by default,
    # which would give every test host the same ID.
    daemon_json = host.host_dir / "daemon.json"
    daemon_json.write_text(json.dumps({"deprecated-key-path": str(host.host_dir / "key.json")}) + "\n")
    dockerd = _spawn(
        host.netns,
        [
            "dockerd",
            f"--host=tcp://{host.address}:{DOCKER_PORT}",
            # Without an explicit --tls=false dockerd sleeps 15 s to warn about plain TCP.
            "--tls=false",
            f"--config-file={daemon_json}",
            f"--data-root={host.data_root}",
            f"--exec-root={host.exec_root}",
            f"--pidfile={host.host_dir / 'dockerd.pid'}",
            f"--containerd={containerd_dir / 'containerd.sock'}",
            "--shutdown-timeout=2",
        ],
        host.log_path,
        hostname=host.name,
    )
    host.pid = dockerd.pid
    host.containerd_pid = containerd.pid
    return [containerd, dockerd]


def wait_ready(hosts: list[TestHost], timeout: float = 60.0) -> None:
    """Wait until every host's Docker API answers a ping."""
    deadline = time.monotonic() + timeout
    pending = list(hosts)
    last_error: dict[str, str] = {}
    while pending:
        for host in list(pending):
            if host.pid and not _alive(host.pid):
                raise HostStartError(f"{host.name}: dockerd exited\n--- {host.log_path}\n{_tail(host.log_path)}")
            try:
                client = docker.APIClient(base_url=host.docker_url, timeout=1, version="1.24")
                client.ping()
                client.close()
                pending.remove(host)
            except Exception as exc:  # connection refused until dockerd listens
                last_error[host.name] = f"{type(exc).__name__}: {exc}"
        if pending and time.monotonic() > deadline:
            host = pending[0]
            raise HostStartError(
                f"{host.name}: dockerd at {host.docker_url} not answering after {timeout:.0f} s "
                f"({last_error.get(host.name)})\n--- {host.log_path}\n{_tail(host.log_path)}"
            )
        if pending:
            time.sleep(0.05)


def _networks_in_use() -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    """Every IPv4 network the root namespace routes or has an address in, with its device."""
    found = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        fields = line.split()
        found.append((ipaddress.ip_network(fields[3], strict=False), fields[1]))
    for line in _ip("-4", "route", "show").stdout.splitlines():
        fields = line.split()
        dest = fields[1] if fields[0] in ("blackhole", "unreachable", "prohibit") else fields[0]
        dev = fields[fields.index("dev") + 1] if "dev" in fields else fields[0]
        with contextlib.suppress(ValueError):  # "default", multipath "nexthop" lines
            found.append((ipaddress.ip_network(dest, strict=False), dev))
    return found


def _subnet_conflicts(subnet_base: str, count: int) -> list[str]:
    in_use = _networks_in_use()
    conflicts = []
    for index in range(count):
        ours = ipaddress.ip_network(_host_net(subnet_base, index)[2])
        conflicts += [f"{ours} overlaps {net} ({dev})" for net, dev in in_use if net.overlaps(ours)]
    return conflicts


def pick_subnet_base(count: int, first: int = 231, last: int = 254) -> str:
    """A ``10.N`` whose first ``count`` /24s are unused on this machine."""
    for second in range(first, last + 1):
        if not _subnet_conflicts(f"10.{second}", count):
            return f"10.{second}"
    raise HarnessError(f"no free 10.N subnet for {count} test hosts in 10.{first}..10.{last}")


def start_hosts(
    count: int = 3,
    prefix: str = "mfh",
    subnet_base: str | None = "10.231",
    base_dir: Path = BASE_DIR,
    timeout: float = 60.0,
    data_size: str | None = None,
) -> list[TestHost]:
    """Start ``count`` Docker hosts ``{prefix}0..`` in parallel and wait until they answer.

    Host i gets ``{subnet_base}.{i}.2``; ``subnet_base=None`` picks a free ``10.N``. With
    ``data_size`` (e.g. ``"96m"``) each host's data root is a tmpfs of that size: a small disk.
    Leftovers with the same prefix (earlier aborted runs) are removed first; hosts with this
    prefix owned by another live process raise HostsBusyError, and so does a subnet that
    is already in use on this machine. On failure everything started is torn down again.
    """
    if reason := check_prerequisites():
        raise HarnessError(f"cannot start test hosts: {reason}")
    if not 1 <= count <= 250:
        raise ValueError("count must be within 1..250")
    _lock_prefix(prefix, base_dir)  # held until stop_hosts, or until this process dies
    hosts: list[TestHost] = []
    try:
        _remove_hosts(prefix, base_dir, keep_logs=False)
        # Choosing a subnet and claiming it must not race with another session doing the same.
        network_lock = _flock(base_dir / ".locks" / "network.lock", blocking=True)
        assert network_lock is not None
        try:
            if subnet_base is None:
                subnet_base = pick_subnet_base(count)
            elif conflicts := _subnet_conflicts(subnet_base, count):
                raise HostsBusyError(f"subnet {subnet_base}.* is in use: {'; '.join(conflicts)}")
            for index in range(count):
                hosts.append(_new_host(prefix, index, subnet_base, base_dir))
                _setup_network(hosts[-1].name, hosts[-1].veth, hosts[-1].gateway, hosts[-1].address)
        finally:
            os.close(network_lock)
        for host in hosts:
            _CHILDREN.setdefault(prefix, []).extend(_start_daemons(host, data_size))
        # All daemons boot concurrently; this only polls.
        wait_ready(hosts, timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            _remove_hosts(prefix, base_dir, keep_logs=True)
        _unlock_prefix(prefix)
        raise
    return hosts


def _new_host(prefix: str, index: int, subnet_base: str, base_dir: Path) -> TestHost:
    name = f"{prefix}{index}"
    root_addr, ns_addr, _net = _host_net(subnet_base, index)
    host_dir, data_root, exec_root = _host_dirs(base_dir, name)
    host_dir.mkdir(parents=True, exist_ok=True)
    return TestHost(
        name=name,
        netns=name,
        address=ns_addr,
        docker_url=f"tcp://{ns_addr}:{DOCKER_PORT}",
        data_root=data_root,
        pid=0,
        index=index,
        veth=f"{name}r",
        gateway=root_addr,
        host_dir=host_dir,
        exec_root=exec_root,
        log_path=host_dir / "dockerd.log",
    )


# --------------------------------------------------------------------------- partitions


def partition(host: TestHost) -> None:
    """Cut the host off the network (like a pulled cable): its veth goes down on the root side.

    The host's subnet is then routed into a "sink" veth whose peer is down (and ARP off), which
    drops packets silently: clients see timeouts, as with a real partition. Without it the
    packets would leak to the machine's default gateway, and a blackhole/unreachable route
    would fail connect() at once (EINVAL/EHOSTUNREACH) instead of timing out. (No dummy or
    netem here: the CI kernel may lack them; veth is needed anyway.)
    """
    sink = _sink_name(host)
    _ip("link", "set", host.veth, "down")
    if _ip("link", "show", sink, check=False).returncode != 0:
        _ip("link", "add", sink, "type", "veth", "peer", "name", sink[:-1] + "t")
    _ip("link", "set", sink, "arp", "off", "up")
    # `add`, not `replace`: never hijack a route that is not ours.
    _ip("route", "add", host.subnet, "dev", sink)


def heal(host: TestHost, timeout: float = 10.0) -> None:
    """Undo ``partition``; returns once the host's Docker API answers again."""
    _ip("link", "del", _sink_name(host), check=False)  # takes its route along
    _ip("link", "set", host.veth, "up")
    wait_ready([host], timeout)


def restart_dockerd(host: TestHost, down_for: float = 0.0, timeout: float = 30.0) -> None:
    """Restart the host's dockerd (as `systemctl restart docker` would): SIGTERM, which stops its
    containers, then the same command line again after ``down_for`` seconds; containerd keeps running.
    Containers with a restart policy come back as dockerd starts; returns once its API answers."""
    argv = [a.decode() for a in Path(f"/proc/{host.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")]
    if not argv or os.path.basename(argv[0]) != "dockerd":
        raise HarnessError(f"{host.name}: pid {host.pid} is not its dockerd ({argv[:1]})")
    os.kill(host.pid, signal.SIGTERM)
    if still := _wait_dead([host.pid], timeout):
        raise HarnessError(f"{host.name}: dockerd {still} did not exit within {timeout:.0f} s")
    time.sleep(down_for)
    dockerd = _spawn(host.netns, argv, host.log_path, hostname=host.name)
    host.pid = dockerd.pid
    _CHILDREN.setdefault(host.name.rstrip("0123456789"), []).append(dockerd)
    wait_ready([host], timeout)


def _sink_name(host: TestHost) -> str:
    return f"{host.name}s"


def is_partitioned(host: TestHost) -> bool:
    flags = _ip("-o", "link", "show", host.veth).stdout.split("<", 1)[1].split(">", 1)[0]
    return "UP" not in flags.split(",")


# --------------------------------------------------------------------------- images


def find_static_busybox() -> Path:
    """Debian's busybox-static binary (a dynamic busybox would not run inside the image)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists():
            if _elf_has_interpreter(path):
                raise HarnessError(f"{path} is dynamically linked: apt-get install busybox-static")
            return path
    raise HarnessError("busybox not found: apt-get install busybox-static")


def _elf_has_interpreter(path: Path) -> bool:
    """True when the ELF binary asks for a dynamic loader (has a PT_INTERP program header)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # only 64-bit ELF is expected here
            return True
        endian = "<" if head[5] == 1 else ">"
        (phoff,) = struct.unpack_from(endian + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    return any(struct.unpack_from(endian + "I", table, i * phentsize)[0] == 3 for i in range(phnum))


def _tar_add(
    tar: tarfile.TarFile,
    name: str,
    *,
    data: bytes | None = None,
    mode: int = 0o644,
    link: str | None = None,
    directory: bool = False,
) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0  # reproducible layers
    info.uname = info.gname = "root"
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, mode
        tar.addfile(info)
    elif link is not None:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
        tar.addfile(info)
    else:
        payload = data or b""
        info.size, info.mode = len(payload), mode
        tar.addfile(info, io.BytesIO(payload))


def _image_label(client: docker.DockerClient, tag: str, label: str) -> str | None:
    """A label of the image ``tag``; None when there is no such image or label."""
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return (image.labels or {}).get(label)


def _image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def busybox_rootfs_tar() -> bytes:
    """A minimal root filesystem: static busybox, a symlink per applet, /etc/passwd, /tmp."""
    busybox = find_static_busybox()
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d, mode in (
            ("bin", 0o755),
            ("etc", 0o755),
            ("root", 0o700),
            ("tmp", 0o1777),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("var", 0o755),
            ("srv", 0o755),
        ):
            _tar_add(tar, d, directory=True, mode=mode)
        _tar_add(tar, "bin/busybox", data=busybox.read_bytes(), mode=0o755)
        for applet in sorted(set(applets.stdout.split()) - {"busybox"}):
            _tar_add(tar, f"bin/{applet}", link="busybox")
        _tar_add(tar, "usr/bin/env", link="/bin/busybox")  # for `#!/usr/bin/env sh` scripts
        _tar_add(
            tar,
            "etc/passwd",
            data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        _tar_add(tar, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def import_busybox_image(client: docker.DockerClient, tag: str = BUSYBOX_TAG) -> str:
    """Import a busybox image under ``tag`` (no registry involved). Skipped if it exists."""
    if not _image_exists(client, tag):
        repository, _, version = tag.rpartition(":")
        client.api.import_image_from_data(
            busybox_rootfs_tar(),
            repository=repository,
            tag=version,
            changes=[
                "ENV PATH=/bin:/usr/bin",
                'CMD ["sh"]',
                f"LABEL {IMAGE_LABEL}=busybox",
            ],
        )
    return tag


# The test "model server": busybox nc forks one shell per connection (busybox httpd cannot route
# extension-less paths such as /ping to a script). TorchServe-like: GET /ping -> Healthy.
_ECHO_ENTRYPOINT = """\
#!/bin/sh
# PID 1 of the echo image. Traps TERM so that `docker stop` is fast even without --init.
date +%s > /tmp/.started
trap 'exit 0' TERM INT
echo "echo server version ${VERSION:-} listening on ${PORT:-8080}"
nc -ll -p "${PORT:-8080}" -e /srv/echo-handler &
wait
"""

_ECHO_HANDLER = r"""#!/bin/sh
# One HTTP exchange; the connection is on stdin/stdout (nc -ll -e).
#   GET /ping, /healthz, /readyz -> 200 {"status": "Healthy"}, or 500 while not ready:
#       FAIL_READY=1 never ready; READY_DELAY=N ready N seconds after the container started.
#   anything else -> 200 {"version": $VERSION, "host": hostname, "method", "path", "bytes"};
#       with ?sleep=S in the query, after S seconds (a model that takes its time: concurrency).
cr=$(printf '\r')
read -r method target _proto || exit 0
length=0
expect=
request_id=
while IFS= read -r line; do
    line=${line%"$cr"}
    [ -z "$line" ] && break
    case $line in
        [Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]:*) length=$(echo ${line#*:}) ;;
        [Ee][Xx][Pp][Ee][Cc][Tt]:*100-[Cc]ontinue*) expect=1 ;;
        [Xx]-[Rr][Ee][Qq][Uu][Ee][Ss][Tt]-[Ii][Dd]:*) request_id=$(echo ${line#*:}) ;;
    esac
done
# The container log (stderr is not the connection): one line per request, with its id.
echo "$method ${target%%\?*} request_id=${request_id:--}" >&2
case $length in ''|*[!0-9]*) length=0 ;; esac
[ -n "$expect" ] && printf 'HTTP/1.1 100 Continue\r\n\r\n'
# Read the whole body: closing a socket with unread data resets it under the client's feet.
bytes=0
[ "$length" -gt 0 ] && bytes=$(head -c "$length" | wc -c)

reply() {  # reply STATUS JSON
    printf 'HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n' "$1" "${#2}"
    printf 'Connection: close\r\n\r\n%s' "$2"
}
esc() { printf '%s' "$1" | sed 's/[\\"]/\\&/g' | tr -d '\000-\037'; }
ready() {
    [ "${FAIL_READY:-0}" = 1 ] && return 1
    [ -z "${READY_DELAY:-}" ] && return 0
    [ $(( $(date +%s) - $(cat /tmp/.started) )) -ge "$READY_DELAY" ]
}

path=${target%%\?*}
case $target in
    *\?*sleep=*) delay=${target#*sleep=}; delay=${delay%%&*}
        case $delay in ''|*[!0-9.]*) ;; *) sleep "$delay" ;; esac ;;
esac
case $path in
    /ping|/healthz|/readyz)
        if ready; then
            reply "200 OK" '{"status": "Healthy"}'
        else
            reply "500 Internal Server Error" '{"status": "Unhealthy"}'
        fi ;;
    *)
        reply "200 OK" "{\"version\": \"$(esc "${VERSION:-}")\", \"host\": \"$(hostname)\", \
\"method\": \"$(esc "$method")\", \"path\": \"$(esc "$path")\", \"bytes\": $bytes}" ;;
esac
"""


def build_echo_image(client: docker.DockerClient, tag: str = ECHO_TAG, base: str = BUSYBOX_TAG) -> str:
    """Build the echo test server image on top of the busybox image. Skipped if it exists.

    A container of ``base`` is created (never started), the scripts are copied in with
    put_archive, and the container is committed with CMD/EXPOSE set: no registry, no builder.
    """
    digest = hashlib.sha256((_ECHO_ENTRYPOINT + _ECHO_HANDLER).encode()).hexdigest()[:16]
    if _image_label(client, tag, ECHO_DIGEST_LABEL) == digest:
        return tag  # built from these very scripts (an older build is replaced)
    import_busybox_image(client, base)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _tar_add(tar, "srv/echo-server", data=_ECHO_ENTRYPOINT.encode(), mode=0o755)
        _tar_add(tar, "srv/echo-handler", data=_ECHO_HANDLER.encode(), mode=0o755)
    container = client.containers.create(base, command=["true"])
    try:
        container.put_archive("/", buf.getvalue())
        repository, _, version = tag.rpartition(":")
        container.commit(
            repository=repository,
            tag=version,
            changes=[
                'CMD ["/srv/echo-server"]',
                f"EXPOSE {ECHO_PORT}/tcp",
                f"ENV PORT={ECHO_PORT}",
                f"LABEL {IMAGE_LABEL}=echo",
                f"LABEL {ECHO_DIGEST_LABEL}={digest}",
            ],
        )
    finally:
        container.remove(force=True)
    return tag


def published_port(container: Container, private: str = f"{ECHO_PORT}/tcp") -> int:
    """The host port Docker chose for ``private`` (publish with ``ports={private: None}``)."""
    container.reload()
    bindings = container.attrs["NetworkSettings"]["Ports"].get(private) or []
    for binding in bindings:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    raise HarnessError(f"{container.name}: {private} is not published")


def run_echo(
    client: docker.DockerClient,
    version: str = "v1",
    *,
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    **kwargs: Any,
) -> Container:
    """Start an echo container answering with ``version``, port 8080 published on a free port."""
    return client.containers.run(
        ECHO_TAG,
        detach=True,
        environment={"VERSION": version, **(env or {})},
        labels={"modelfleet.managed": "true", **(labels or {})},
        ports={f"{ECHO_PORT}/tcp": None},
        **kwargs,
    )


def http_get(url: str, timeout: float = 2.0, data: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP errors are answers too, not exceptions."""
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_http(url: str, status: int = 200, timeout: float = 10.0) -> bytes:
    """Poll ``url`` until it answers ``status``; returns the body. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            code, body = http_get(url, timeout=1.0)
            if code == status:
                return body
            last = f"HTTP {code}: {body[:200]!r}"
        except (OSError, http.client.HTTPException) as exc:  # refused until the server listens
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer {status} within {timeout} s (last: {last})")
        time.sleep(0.01)


# --------------------------------------------------------------------------- CLI


def host_status(prefix: str = "mfh", base_dir: Path = BASE_DIR) -> list[dict[str, Any]]:
    """What exists for the hosts with this prefix (for `status` and for debugging)."""
    out = []
    for name in _names_with_prefix(prefix, base_dir):
        host_dir = base_dir / name
        procs = _host_processes(name, host_dir)
        out.append(
            {
                "name": name,
                "netns": _netns_id(name) is not None,
                "veth": _ip("link", "show", f"{name}r", check=False).returncode == 0,
                "processes": sorted({p.name for p in procs}),
                "mounts": len(_mounts_under(host_dir)),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--prefix", default="mfh")
    parser.add_argument("--subnet-base", default="10.231")
    parser.add_argument("--base-dir", type=Path, default=BASE_DIR)
    parser.add_argument("--purge", action="store_true", help="down: also delete the daemon logs")
    args = parser.parse_args(argv)

    if args.action == "down":
        names = stop_hosts(args.prefix, args.base_dir, keep_logs=not args.purge)
        print(f"removed: {' '.join(names) or 'nothing'}")
        return 0
    if args.action == "status":
        print(json.dumps(host_status(args.prefix, args.base_dir), indent=2))
        return 0

    t0 = time.monotonic()
    hosts = start_hosts(args.count, args.prefix, args.subnet_base, args.base_dir)
    t1 = time.monotonic()
    print(f"{len(hosts)} hosts up in {t1 - t0:.2f} s")
    for host in hosts:
        client = host.client()
        t2 = time.monotonic()
        import_busybox_image(client)
        t3 = time.monotonic()
        build_echo_image(client)
        t4 = time.monotonic()
        print(
            f"{host.name}: {host.docker_url}  dockerd pid {host.pid}  "
            f"busybox {t3 - t2:.2f} s, echo {t4 - t3:.2f} s  (DOCKER_HOST={host.docker_url})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
