"""Put model artifacts on Docker hosts, once per host and content, into a read-only volume.

``ArtifactShipper.ensure_on_host(client, origin, image)`` returns the name of a Docker volume
holding the model, to mount read-only at ``/model`` (MODEL_MOUNT):

- file origin ``{"file": {"sha256"}}``: ``/model/<modelName>.mar``, the archive as uploaded;
- HuggingFace origin ``{"huggingface": {"model", "revision", "commit"}}``: the snapshot's files
  (``/model/config.json``, ``/model/model.safetensors``, ...), ready for ``from_pretrained("/model")``;
- both: ``/model/.modelfleet-artifact.json`` (id, files with sizes and sha256), written LAST: it
  is the completion marker.

Content-addressed per host: the volume is ``mf-artifact-<24 hex of sha256(artifact id)>``,
labelled ``modelfleet.artifact=<id>`` and ``modelfleet.managed=true``; the id is
``sha256:<hex>`` for a file and ``hf:<org/name>@<commit>`` for a HuggingFace snapshot. A host
whose volume has a valid marker receives nothing (one volume inspect when this process has
already checked it, plus a helper container create/read/remove when it has not).

Transfer: one tar stream generated on the fly (PAX headers, so files beyond 8 GiB work; exact
length, so no chunked encoding) fed to ``put_archive`` of a created-never-started helper
container of ``image`` (the deployment's runtime image, which the host has anyway) that mounts
the volume (``nocopy``). Memory stays flat (one reused buffer of ``chunk_size``), nothing is
hashed twice: a store file's digest is its name; a HuggingFace file is hashed while it streams.

Verification, before the marker is written: a short-lived container of the same image mounts
the volume read-only and prints the sha256 of every file, with ``python3`` (hashlib/OpenSSL:
fast, present in our Python-based runtime images) or else ``sha256sum`` (coreutils or
busybox: present in Debian/Ubuntu-based images such as TEI/TGI and in our busybox test images).
An image with neither gets a size check through Docker's archive stat. ``verify="size"`` skips
the hashing.

Concurrent calls for the same host and artifact are serialized (a lock per host+id): the second
finds the volume complete and sends nothing. ``gc(client, keep)`` removes artifact volumes that
are neither kept nor used by any container.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import secrets
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docker.errors
from docker.types import Mount

from modelfleet.reconciler.artifacts.errors import InvalidOrigin, ShippingError
from modelfleet.reconciler.artifacts.huggingface import HuggingFaceResolver
from modelfleet.reconciler.artifacts.mar import MarInfo, validate_mar
from modelfleet.reconciler.artifacts.store import ArtifactStore, normalize_digest
from modelfleet.reconciler.errors import DockerOperationError, HostUnavailable, ImageMissing
from modelfleet.reconciler.pool.adapter import HostClient
from modelfleet.runtimes.contract import RuntimeEnvironment
from modelfleet.state.artifacts import LABEL_ARTIFACT, UnresolvedArtifact
from modelfleet.state.artifacts import artifact_id as state_artifact_id
from modelfleet.state.desired import DesiredReplica
from modelfleet.state.runtimes import MODEL_MOUNT

log = logging.getLogger("modelfleet.artifacts.shipping")

LABEL_MANAGED = "modelfleet.managed"
LABEL_KIND = "modelfleet.artifact-kind"
LABEL_HELPER = "modelfleet.artifact-helper"
VOLUME_PREFIX = "mf-artifact-"
MARKER = ".modelfleet-artifact.json"
CHUNK_SIZE = 4 << 20
Progress = Callable[[int, int], None]

_VERIFY_PY = (
    "import hashlib,sys\n"
    "for p in sys.argv[1:]:\n"
    "    h=hashlib.sha256()\n"
    "    with open(p,'rb') as f:\n"
    "        while True:\n"
    "            b=f.read(1<<22)\n"
    "            if not b: break\n"
    "            h.update(b)\n"
    "    print(h.hexdigest()+'  '+p, flush=True)\n"
)
# (name, entrypoint): each prints "<hex>  <path>" per argument, like sha256sum.
_HASH_TOOLS: tuple[tuple[str, list[str]], ...] = (
    ("python3", ["python3", "-c", _VERIFY_PY]),
    ("sha256sum", ["sha256sum"]),
)


# --- what to ship -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShipFile:
    path: str  # relative to /model, '/'-separated
    source: Path
    size: int
    sha256: str | None = None  # known digest (store files); None: hashed while streaming


@dataclass(frozen=True)
class ArtifactPlan:
    id: str
    kind: Literal["mar", "huggingface"]
    files: tuple[ShipFile, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def volume(self) -> str:
        return volume_name(self.id)


def artifact_id(origin: Mapping[str, Any]) -> str:
    """The content id of a resolved origin (state/artifacts.py); InvalidOrigin when it names none."""
    try:
        return state_artifact_id(origin)
    except UnresolvedArtifact as exc:
        raise InvalidOrigin(str(exc)) from None


def volume_name(artifact: str) -> str:
    """``mf-artifact-<first 24 hex of sha256(id)>`` for an artifact id."""
    return VOLUME_PREFIX + hashlib.sha256(artifact.encode()).hexdigest()[:24]


def model_binds(volume: str) -> dict[str, dict[str, str]]:
    """The ``binds`` to pass to Docker (ContainerSpec.volumes): the volume read-only at /model."""
    return {volume: {"bind": MODEL_MOUNT, "mode": "ro"}}


# --- the tar stream ---------------------------------------------------------------------------


def _tar_header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o444
    info.mtime = int(time.time())
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class TarStream:
    """A tar of ``files`` produced on the fly (headers, content, padding, end blocks), of known length.

    Iterating yields memoryviews of one reused buffer of ``chunk_size`` bytes (each is sent before
    the next is read), so memory stays at one chunk whatever the file sizes. ``len()`` is exact, so
    the HTTP request carries a Content-Length: urllib3 then sends each chunk as is, where chunked
    transfer encoding would copy every chunk once more. Files without a known digest are hashed as
    they stream, into ``digests[path]``. A source file that changes size raises ShippingError (the
    host then holds no marker: the next pass ships again).
    """

    def __init__(self, files: tuple[ShipFile, ...], chunk_size: int, on_bytes: Callable[[int], None],
                 digests: dict[str, str]) -> None:
        self.files = files
        self.chunk_size = chunk_size
        self.on_bytes = on_bytes
        self.digests = digests
        directories = sorted({"/".join(f.path.split("/")[:i]) for f in files for i in range(1, f.path.count("/") + 1)})
        self._dir_headers = [_tar_header(d, 0, directory=True) for d in directories]
        self._file_headers = [_tar_header(f.path, f.size) for f in files]
        self._length = (sum(len(h) for h in self._dir_headers) + sum(len(h) for h in self._file_headers)
                        + sum(f.size + (-f.size % 512) for f in files) + 1024)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes | memoryview]:
        yield from self._dir_headers
        buffer = bytearray(self.chunk_size)
        view = memoryview(buffer)
        for file, header in zip(self.files, self._file_headers, strict=True):
            yield header
            hasher = hashlib.sha256() if file.sha256 is None else None
            remaining = file.size
            try:
                with open(file.source, "rb", buffering=0) as fh:
                    while remaining:
                        n = fh.readinto(view[: min(self.chunk_size, remaining)])
                        if not n:
                            raise ShippingError(f"{file.source} is shorter than {file.size} bytes "
                                                "(changed while shipping)")
                        chunk = view[:n]
                        if hasher is not None:
                            hasher.update(chunk)
                        remaining -= n
                        self.on_bytes(n)
                        yield chunk
            except OSError as exc:
                raise ShippingError(f"cannot read {file.source}: {exc.strerror}") from None
            if hasher is not None:
                self.digests[file.path] = hasher.hexdigest()
            if file.size % 512:
                yield b"\0" * (512 - file.size % 512)
        yield b"\0" * 1024


def _small_tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- raw Docker calls on one host -------------------------------------------------------------


class ArtifactHostOps:
    """The few raw Docker calls shipping needs, translated by the HostClient's error mapping."""

    def __init__(self, client: HostClient) -> None:
        self.client = client
        self.api = client._docker().api

    def inspect_volume(self, name: str) -> dict[str, Any] | None:
        with self.client._translate("inspect volume"):
            try:
                data: dict[str, Any] = self.api.inspect_volume(name)
                return data
            except docker.errors.NotFound:
                return None

    def create_volume(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        # Told before and after: a list of the host's artifacts made meanwhile is not kept.
        self.client.artifacts_changed()
        try:
            with self.client._translate("create volume"):
                data: dict[str, Any] = self.api.create_volume(name=name, driver="local", labels=labels)
                return data
        finally:
            self.client.artifacts_changed()

    def remove_volume(self, name: str) -> bool:
        """False when the volume is in use (or gone already)."""
        self.client.artifacts_changed()
        try:
            with self.client._translate("remove volume"):
                self.api.remove_volume(name)
            return True
        except DockerOperationError as exc:
            if "in use" in str(exc) or "No such volume" in str(exc) or "no such volume" in str(exc):
                return False
            raise
        finally:
            self.client.artifacts_changed()

    def artifact_volumes(self) -> list[dict[str, Any]]:
        with self.client._translate("list volumes"):
            data = self.api.volumes(filters={"label": [LABEL_ARTIFACT, f"{LABEL_MANAGED}=true"]})
        return list(data.get("Volumes") or [])

    def containers_using(self, volume: str) -> list[dict[str, Any]]:
        with self.client._translate("list containers"):
            return list(self.api.containers(all=True, filters={"volume": volume}))

    def helpers(self) -> list[dict[str, Any]]:
        with self.client._translate("list containers"):
            return list(self.api.containers(all=True, filters={"label": [LABEL_HELPER, f"{LABEL_MANAGED}=true"]}))

    def create_helper(self, image: str, volume: str, artifact: str, *, read_only: bool = False,
                      entrypoint: list[str] | None = None, command: list[str] | None = None) -> str:
        if not self.client.image_present(image):
            raise ImageMissing(self.client.name, image)
        with self.client._translate(f"create artifact helper for volume {volume}"):
            host_config = self.api.create_host_config(
                mounts=[Mount(MODEL_MOUNT, volume, type="volume", read_only=read_only, no_copy=True)],
                network_mode="none",
            )
            created = self.api.create_container(
                image=image, entrypoint=entrypoint, command=command or ["true"],
                name=f"{volume}-helper-{secrets.token_hex(4)}",
                labels={LABEL_MANAGED: "true", LABEL_HELPER: artifact}, host_config=host_config,
                network_disabled=True, detach=True,
            )
        return str(created["Id"])

    def put_archive(self, container: str, data: Any) -> None:
        with self.client._translate("copy artifact"):
            self.api.put_archive(container, MODEL_MOUNT, data)

    def read_file(self, container: str, path: str, limit: int = 1 << 20) -> bytes | None:
        """A small file from a container (or a volume it mounts); None when absent."""
        with self.client._translate("read artifact marker"):
            try:
                stream, _stat = self.api.get_archive(container, path)
            except docker.errors.NotFound:
                return None
            raw = b"".join(stream)
        if len(raw) > limit + 4096:
            return None
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            extracted = tar.extractfile(member) if member is not None else None
            return extracted.read() if extracted is not None else None

    def stat(self, container: str, path: str) -> dict[str, Any] | None:
        """Docker's archive stat of a path (name, size, mode, mtime), without transferring it."""
        with self.client._translate("stat artifact file"):
            response = self.api.head(self.api._url("/containers/{0}/archive", container), params={"path": path})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise DockerOperationError(self.client.name, "stat artifact file", f"HTTP {response.status_code}")
        header = response.headers.get("X-Docker-Container-Path-Stat", "")
        data: dict[str, Any] = json.loads(base64.b64decode(header))
        return data

    def run_once(self, container: str, timeout: float, expect_lines: int = 0) -> tuple[int, str]:
        """Start a created container, wait, return (exit code, output).

        dockerd may still be copying the output of an exited container to its log: when fewer than
        ``expect_lines`` lines came back, the logs are read again for a short while.
        """
        with self.client._translate("run artifact check"):
            self.api.start(container)
            result = self.api.wait(container, timeout=timeout)
            code = int(result.get("StatusCode", -1))
            deadline = time.monotonic() + 3.0
            while True:
                logs = self.api.logs(container, stdout=True, stderr=True)
                text = logs.decode("utf-8", "replace") if isinstance(logs, bytes) else str(logs)
                if code != 0 or len(text.splitlines()) >= expect_lines or time.monotonic() > deadline:
                    return code, text
                time.sleep(0.05)

    def remove(self, container: str) -> None:
        with contextlib.suppress(Exception), self.client._translate("remove artifact helper"):
            self.api.remove_container(container, force=True)


# --- the shipper --------------------------------------------------------------------------------


@dataclass
class Transfer:
    host: str
    artifact: str
    volume: str
    bytes: int
    seconds: float
    verify_seconds: float
    verified_by: str


class ArtifactShipper:
    def __init__(
        self,
        store: ArtifactStore,
        hf_resolver: HuggingFaceResolver | None,
        *,
        chunk_size: int = CHUNK_SIZE,
        verify: Literal["sha256", "size"] = "sha256",
        verify_timeout: float = 3600.0,
        progress_interval: float = 0.25,
        on_progress: Callable[[str, str, int, int], None] | None = None,
    ) -> None:
        """``on_progress(host, artifact_id, sent, total)`` receives the progress of every transfer
        that ``prepare_volumes`` starts (for the daemon's status)."""
        self.store = store
        self.hf = hf_resolver
        self.chunk_size = chunk_size
        self.verify = verify
        self.verify_timeout = verify_timeout
        self.progress_interval = progress_interval
        self.on_progress = on_progress
        self.bytes_sent = 0  # payload bytes put on hosts by this shipper, in all
        self.transfers: list[Transfer] = []  # the last ones, for status and tests
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._complete: dict[tuple[str, str], str] = {}  # (host, volume) -> volume CreatedAt, checked
        self._mar_info: dict[str, MarInfo] = {}
        self._hash_tool: dict[tuple[str, str], str | None] = {}  # (host, image) -> tool that worked

    # --- public API ---------------------------------------------------------------------------

    def plan(self, origin: Mapping[str, Any]) -> ArtifactPlan:
        """What a volume for ``origin`` holds (downloads a HuggingFace snapshot if needed)."""
        artifact = artifact_id(origin)
        if artifact.startswith("sha256:"):
            digest = artifact.removeprefix("sha256:")
            path = self.store.path(digest)  # ArtifactNotFound when not uploaded
            info = self.mar_info(digest)
            size = path.stat().st_size
            files = (ShipFile(f"{info.model_name}.mar", path, size, digest),)
            meta = {"model_name": info.model_name, "version": info.version, "handler": info.handler,
                    "archive": f"{MODEL_MOUNT}/{info.model_name}.mar"}
            return ArtifactPlan(artifact, "mar", files, meta)
        hf = origin["huggingface"]
        if self.hf is None:
            raise InvalidOrigin("HuggingFace origins need a HuggingFaceResolver (integrations.huggingface)")
        folder = self.hf.snapshot(hf["model"], hf["commit"])
        entries = []
        for source in sorted(folder.rglob("*")):
            rel = source.relative_to(folder).as_posix()
            if rel == MARKER or not source.is_file():
                continue
            real = source.resolve()
            entries.append(ShipFile(rel, real, real.stat().st_size))
        if not entries:
            raise InvalidOrigin(f"HuggingFace model {hf['model']}@{hf['commit']} has no files")
        meta = {"model": hf["model"], "revision": hf.get("revision"), "commit": hf["commit"]}
        return ArtifactPlan(artifact, "huggingface", tuple(entries), meta)

    def mar_info(self, digest: str) -> MarInfo:
        digest = normalize_digest(digest)
        info = self._mar_info.get(digest)
        if info is None:
            info = validate_mar(self.store.path(digest), display_name=f"sha256:{digest}")
            self._mar_info[digest] = info
        return info

    def runtime_environment(self, origin: Mapping[str, Any] | None) -> RuntimeEnvironment:
        """What a replica mounting the artifact at /model is told about it (the runtime contract)."""
        if not origin:
            return RuntimeEnvironment()
        artifact = artifact_id(origin)
        if origin.get("file"):
            info = self.mar_info(str(origin["file"]["sha256"]))
            return RuntimeEnvironment(model_dir=MODEL_MOUNT, artifact=artifact,
                                      model_archive=f"{MODEL_MOUNT}/{info.model_name}.mar",
                                      model_name=info.model_name)
        hf = origin["huggingface"]
        commit = hf.get("commit")
        return RuntimeEnvironment(model_dir=MODEL_MOUNT, artifact=artifact, model_id=str(hf["model"]),
                                  hf_commit=str(commit) if commit else None, offline=True)

    def container_env(self, origin: Mapping[str, Any] | None) -> dict[str, str]:
        """``runtime_environment(origin)`` as variables (the Applier's ``origin_env`` hook)."""
        return self.runtime_environment(origin).to_env()

    def ensure_on_host(self, client: HostClient, origin: Mapping[str, Any], image: str,
                       progress: Progress | None = None) -> str:
        """The name of a complete volume with the artifact on ``client``'s host (shipped if needed)."""
        plan = self.plan(origin)
        volume = plan.volume
        with self._lock_for(client.name, plan.id):
            ops = ArtifactHostOps(client)
            existing = ops.inspect_volume(volume)
            if existing is not None:
                labels = existing.get("Labels") or {}
                if labels.get(LABEL_ARTIFACT) != plan.id:
                    raise ShippingError(f"volume {volume} on {client.name} is labelled "
                                        f"{labels.get(LABEL_ARTIFACT)!r}, not {plan.id!r}: remove it")
                created = str(existing.get("CreatedAt"))
                if self._complete.get((client.name, volume)) == created or self._has_marker(ops, plan, image):
                    self._complete[(client.name, volume)] = created
                    return volume
                # A leftover of an interrupted transfer: start over in a fresh volume if possible.
                if ops.remove_volume(volume):
                    existing = None
            if existing is None:
                existing = ops.create_volume(volume, {LABEL_MANAGED: "true", LABEL_ARTIFACT: plan.id,
                                                      LABEL_KIND: plan.kind})
            self._ship(ops, plan, image, progress)
            after = ops.inspect_volume(volume)
            self._complete[(client.name, volume)] = str((after or existing).get("CreatedAt"))
            return volume

    def prepare_volumes(self, client: HostClient, replica: DesiredReplica) -> dict[str, dict[str, str]] | None:
        """The Applier's ``prepare_volumes`` hook: the replica's artifact read-only at /model (None
        for a deployment without origin). Ships first if the host does not have it yet."""
        if not replica.origin:
            return None
        progress: Progress | None = None
        if self.on_progress is not None:
            sink, host, artifact = self.on_progress, client.name, artifact_id(replica.origin)

            def progress(sent: int, total: int) -> None:
                sink(host, artifact, sent, total)

        volume = self.ensure_on_host(client, replica.origin, replica.runtime.image, progress)
        return model_binds(volume)

    def gc(self, client: HostClient, keep: set[str]) -> list[str]:
        """Remove artifact volumes of ``client``'s host that are not in ``keep`` (artifact ids or
        volume names) and not used by any container; also leftover helper containers."""
        ops = ArtifactHostOps(client)
        for helper in ops.helpers():
            artifact = (helper.get("Labels") or {}).get(LABEL_HELPER, "")
            lock = self._lock_for(client.name, artifact)
            if lock.acquire(blocking=False):  # not in use by a transfer of ours right now
                try:
                    ops.remove(helper["Id"])
                finally:
                    lock.release()
        removed = []
        for volume in ops.artifact_volumes():
            name = volume["Name"]
            artifact = (volume.get("Labels") or {}).get(LABEL_ARTIFACT, "")
            if not name.startswith(VOLUME_PREFIX) or artifact in keep or name in keep:
                continue
            lock = self._lock_for(client.name, artifact)
            if not lock.acquire(blocking=False):
                continue
            try:
                if ops.containers_using(name):
                    continue
                if ops.remove_volume(name):
                    removed.append(name)
                    self._complete.pop((client.name, name), None)
            finally:
                lock.release()
        if removed:
            log.info("removed unused artifact volumes on %s: %s", client.name, ", ".join(removed))
        return removed

    # --- internals ----------------------------------------------------------------------------

    def _lock_for(self, host: str, artifact: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault((host, artifact), threading.Lock())

    def _has_marker(self, ops: ArtifactHostOps, plan: ArtifactPlan, image: str) -> bool:
        helper = ops.create_helper(image, plan.volume, plan.id, read_only=True)
        try:
            raw = ops.read_file(helper, f"{MODEL_MOUNT}/{MARKER}")
        finally:
            ops.remove(helper)
        if raw is None:
            return False
        try:
            marker = json.loads(raw)
        except ValueError:
            return False
        expected = {(f.path, f.size) for f in plan.files}
        found = {(f.get("path"), f.get("size")) for f in marker.get("files", []) if isinstance(f, dict)}
        return bool(marker.get("id") == plan.id and expected == found)

    def _ship(self, ops: ArtifactHostOps, plan: ArtifactPlan, image: str, progress: Progress | None) -> None:
        host = ops.client.name
        total = plan.size
        sent = 0
        last_report = 0.0

        def on_bytes(n: int) -> None:
            nonlocal sent, last_report
            sent += n
            if progress is not None:
                now = time.monotonic()
                if now - last_report >= self.progress_interval or sent == total:
                    last_report = now
                    with contextlib.suppress(Exception):
                        progress(sent, total)

        log.info("shipping %s (%d bytes) to %s", plan.id, total, host)
        if progress is not None:
            progress(0, total)
        digests: dict[str, str] = {f.path: f.sha256 for f in plan.files if f.sha256 is not None}
        started = time.monotonic()
        helper = ops.create_helper(image, plan.volume, plan.id)
        shipped = False
        try:
            try:
                ops.put_archive(helper, TarStream(plan.files, self.chunk_size, on_bytes, digests))
            except (DockerOperationError, HostUnavailable) as exc:
                raise ShippingError(_copy_failed(plan, host, f"after {sent} of {total} bytes", exc)) from None
            finally:
                with self._lock:
                    self.bytes_sent += sent
            if sent != total:
                raise ShippingError(f"sent {sent} of {total} bytes of {plan.id} to {host}")
            transfer_seconds = time.monotonic() - started
            verified_at = time.monotonic()
            verified_by = self._verify(ops, plan, image, helper, digests)
            verify_seconds = time.monotonic() - verified_at
            marker = {
                "id": plan.id, "kind": plan.kind, "shippedAt": time.time(), **plan.meta,
                "files": [{"path": f.path, "size": f.size, "sha256": digests.get(f.path)} for f in plan.files],
            }
            try:
                ops.put_archive(helper, _small_tar(MARKER, json.dumps(marker, indent=1).encode()))
            except (DockerOperationError, HostUnavailable) as exc:
                raise ShippingError(_copy_failed(plan, host, f"writing its completion marker {MARKER}", exc)) \
                    from None
            shipped = True
        finally:
            ops.remove(helper)
            if not shipped:
                # Never leave a half volume behind: it holds no marker (never mounted as complete),
                # and removing it now gives back the space it took (a full disk stays usable).
                with contextlib.suppress(Exception):
                    ops.remove_volume(plan.volume)
        record = Transfer(host, plan.id, plan.volume, sent, transfer_seconds, verify_seconds, verified_by)
        with self._lock:
            self.transfers = [*self.transfers[-99:], record]
        log.info("shipped %s to %s: %d bytes in %.2fs (%.0f MiB/s), verified by %s in %.2fs", plan.id, host,
                 sent, transfer_seconds, sent / max(transfer_seconds, 1e-9) / 2**20, verified_by, verify_seconds)

    def _verify(self, ops: ArtifactHostOps, plan: ArtifactPlan, image: str, helper: str,
                digests: dict[str, str]) -> str:
        """Check what landed on the host; returns how ("python3", "sha256sum" or "size")."""
        host = ops.client.name
        for file in plan.files:  # sizes first: cheap, and catches truncation whatever the image
            stat = ops.stat(helper, f"{MODEL_MOUNT}/{file.path}")
            if stat is None or int(stat.get("size", -1)) != file.size:
                raise ShippingError(f"{plan.id} on {host}: {file.path} has size "
                                    f"{None if stat is None else stat.get('size')}, expected {file.size}")
        if self.verify == "size":
            return "size"
        paths = [f"{MODEL_MOUNT}/{f.path}" for f in plan.files]
        tools = _HASH_TOOLS
        known = self._hash_tool.get((host, image), "")
        if known is None:
            return "size"
        if known:
            tools = tuple(t for t in _HASH_TOOLS if t[0] == known)
        for name, entrypoint in tools:
            checker = ops.create_helper(image, plan.volume, plan.id, read_only=True, entrypoint=entrypoint,
                                        command=paths)
            try:
                try:
                    code, output = ops.run_once(checker, self.verify_timeout, expect_lines=len(paths))
                except DockerOperationError as exc:
                    if _missing_executable(str(exc)):
                        continue
                    raise
            finally:
                ops.remove(checker)
            if code in (126, 127) or (code != 0 and _missing_executable(output)):
                continue
            if code != 0:
                raise ShippingError(f"verifying {plan.id} on {host} with {name} failed (exit {code}): "
                                    f"{output.strip()[-300:]}")
            found = _parse_sums(output)
            for file in plan.files:
                got = found.get(f"{MODEL_MOUNT}/{file.path}")
                if got != digests.get(file.path):
                    raise ShippingError(f"{plan.id} on {host}: {file.path} has sha256 {got}, "
                                        f"expected {digests.get(file.path)} (corrupted in transit)")
            self._hash_tool[(host, image)] = name
            return name
        log.warning("image %s on %s has neither python3 nor sha256sum: %s verified by size only", image, host,
                    plan.id)
        self._hash_tool[(host, image)] = None
        return "size"


def _copy_failed(plan: ArtifactPlan, host: str, where: str, exc: Exception) -> str:
    detail = str(exc)
    hint = ""
    if "no space left" in detail.lower() or "disk quota" in detail.lower():
        hint = f" (disk full on host {host}: free space under its Docker data root)"
    return (f"copying {plan.id} ({plan.size} bytes) into volume {plan.volume} on host {host} failed {where}: "
            f"{detail}{hint}; the volume is not marked complete (never mounted) and is removed; the next pass "
            "ships it again")


def _missing_executable(text: str) -> bool:
    lowered = text.lower()
    return "executable file not found" in lowered or "no such file or directory" in lowered or \
        ("not found" in lowered and ("exec" in lowered or "sh:" in lowered))


def _parse_sums(output: str) -> dict[str, str]:
    sums = {}
    for line in output.splitlines():
        digest, _, path = line.strip().partition("  ")
        if len(digest) == 64 and path:
            sums[path.lstrip("*")] = digest
    return sums
