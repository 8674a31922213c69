"""Build the runtime images on Docker hosts, without a registry.

    build_runtime_images(["tcp://10.0.0.2:2375", ...], base_image="local")

makes, on every host, ``modelfleet/runtime-torch:0.1.0`` and ``modelfleet/runtime-transformers:0.1.0``.
Both sit on one dependencies image, ``modelfleet/runtime-deps:<hash>`` (a venv in /opt/modelfleet
with torch 2.13.0 CPU, TorchServe's ``ts`` package, transformers, diffusers, starlette/uvicorn);
each adds the ``modelfleet.runtimes`` package alone (in /opt/modelfleet/app) and its entry point,
so the pair costs the disk of one (~1.2 GiB). They run as uid/gid 65534 and listen on 8080.

Steps, each cached under ``cache_dir`` (default ``$MODELFLEET_CACHE_DIR`` or /var/cache/modelfleet):

1. Wheelhouse: ``pip download`` of the pinned requirements for CPython 3.11 manylinux (torch is the
   CPU build that pip finds for ``torch==2.13.0``); ``wheelhouse-<key>/``, reused while the pins
   do not change. Containers never reach a package index: the build installs with
   ``pip install --no-index --find-links``.
2. Base image: ``base_image`` is a build argument. A registry image (default ``python:3.11-slim``)
   is pulled when missing. ``"local"`` (or ``modelfleet/python-base:bookworm``) makes it here:
   ``debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm``
   (~1 min, needs root), the rootfs tarball cached as ``rootfs-bookworm-<key>.tar``, then
   ``docker import``.
3. Hashes (``content``): the dependencies image's (Dockerfile, pins, wheel names, base image name or
   rootfs digest) and the runtime images' (that + their Dockerfile + the files of
   ``modelfleet.runtimes`` copied in), as image labels ``modelfleet.runtime.content-hash``: a host
   that has the images with the same hash is skipped. This build code is in no hash.
4. Build once, copy to the others: the dependencies image is built on one host (the build context
   streamed to the Docker API, classic builder), saved to ``images-<hash>.tar`` in the cache, and
   ``docker load``ed on the other hosts (and on fresh hosts later, with no build at all). The two
   runtime images are then built on each host from a small context (~2 s), so a change of the
   runtimes' code never rebuilds the dependencies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.reconciler.images.content import (
    DEFAULT_BASE_IMAGE,
    DEPS_REPOSITORY,
    ENTRY_MODULES,
    LABEL_CONTENT_HASH,
    LABEL_RUNTIME,
    REQUIREMENTS,
    RUNTIME_IMAGES,
    app_context,
    content_hash,
    deps_hash,
    runtimes_sources,
    write_deps_context,
)
from modelfleet.reconciler.images.progress import Reporter

LOCAL_BASE_IMAGE = "modelfleet/python-base:bookworm"
LOCAL_BASE_ALIASES = ("local", "debootstrap", LOCAL_BASE_IMAGE)
DEFAULT_CACHE_DIR = Path("/var/cache/modelfleet")
LABEL_ROOTFS = "modelfleet.base-rootfs"
DEBIAN_SUITE = "bookworm"
DEBIAN_INCLUDE = ("python3", "python3-venv", "ca-certificates")
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


class ImageBuildError(RuntimeError):
    """A step of the image build failed; the message says which and why."""


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODELFLEET_CACHE_DIR") or DEFAULT_CACHE_DIR)


@contextlib.contextmanager
def _cache_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """One builder per cache entry at a time (a CI run and a developer may share the cache)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]

# --------------------------------------------------------------------------- wheelhouse


def _platform_tags() -> list[str]:
    machine = platform.machine() or "x86_64"
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(36, 16, -1)]
    tags += [f"manylinux2014_{machine}"]
    if machine == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64", *(f"manylinux_2_{m}_x86_64" for m in (12, 5))]
    return tags


def ensure_wheelhouse(cache_dir: Path, reporter: Reporter | None = None, requirements: str = REQUIREMENTS) -> Path:
    """The wheels for the images (CPython 3.11, manylinux), downloaded once per set of pins."""
    reporter = reporter or Reporter(show=False)
    key = _short(requirements + " ".join(_platform_tags()))
    wheelhouse = cache_dir / f"wheelhouse-{key}"
    stamp = wheelhouse / ".complete"
    with _cache_lock(cache_dir, "wheelhouse"):
        if stamp.is_file():
            return wheelhouse
        with reporter.step("wheelhouse: pip download (CPython 3.11, manylinux)") as update:
            partial = cache_dir / f"wheelhouse-{key}.partial"
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "requirements.txt").write_text(requirements)
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off",
                   "--dest", str(partial), "--only-binary=:all:", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311"]
            for tag in _platform_tags():
                cmd += ["--platform", tag]
            cmd += ["-r", str(partial / "requirements.txt")]
            _run_streaming(cmd, update, "pip download")
            cuda = sorted(p.name for p in partial.glob("nvidia_*.whl"))
            if cuda:
                raise ImageBuildError(f"the wheelhouse got a CUDA build of torch (with {', '.join(cuda[:3])}, ...): "
                                      f"the images need the CPU build of torch==2.13.0")
            if wheelhouse.exists():
                shutil.rmtree(wheelhouse)
            partial.rename(wheelhouse)
            stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return wheelhouse


def _run_streaming(cmd: list[str], update: Callable[[str], None], what: str, **kwargs: Any) -> None:
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-30:], line.rstrip()]
            update(line)
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed ({proc.returncode}):\n" + "\n".join(tail))

# --------------------------------------------------------------------------- base image


def debian_mirror() -> str:
    """The Debian mirror for debootstrap: $MODELFLEET_DEBIAN_MIRROR, else the one apt uses here."""
    configured = os.environ.get("MODELFLEET_DEBIAN_MIRROR")
    if configured:
        return configured
    for path in APT_SOURCES:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1:  # deb822 (.sources)
                return words[1]
            if words[:1] == ["deb"]:  # one-line format: deb [options] URI suite components
                uris = [w for w in words[1:] if "://" in w]
                if uris:
                    return uris[0]
    raise ImageBuildError("no Debian mirror found in the apt sources: set MODELFLEET_DEBIAN_MIRROR")


def ensure_rootfs(cache_dir: Path, reporter: Reporter | None = None) -> tuple[Path, str]:
    """(rootfs tarball, its sha256): debootstrap'ed Debian with Python 3.11, made once and cached."""
    reporter = reporter or Reporter(show=False)
    key = _short(f"{DEBIAN_SUITE} minbase {','.join(DEBIAN_INCLUDE)}")
    tar_path = cache_dir / f"rootfs-{DEBIAN_SUITE}-{key}.tar"
    sha_path = tar_path.with_suffix(".tar.sha256")
    with _cache_lock(cache_dir, "rootfs"):
        if tar_path.is_file() and sha_path.is_file():
            return tar_path, sha_path.read_text().strip()
        if shutil.which("debootstrap") is None:
            raise ImageBuildError("debootstrap is not installed (apt-get install debootstrap), or pass a registry "
                                  "base image with --base-image")
        if os.geteuid() != 0:
            raise ImageBuildError("making the local base image with debootstrap needs root")
        with reporter.step(f"base rootfs: debootstrap {DEBIAN_SUITE} (minbase + python3)") as update:
            work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache_dir))
            try:
                _run_streaming(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_INCLUDE)}",
                                DEBIAN_SUITE, str(work / "root"), debian_mirror()], update, "debootstrap")
                root = work / "root"
                for leftover in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
                    for item in (root / leftover).glob("*"):
                        if item.is_file():
                            item.unlink()
                update("packing the rootfs")
                partial = tar_path.with_suffix(".tar.partial")
                _run_streaming(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
                               update, "tar")
                sha = _sha256_file(partial)
                partial.rename(tar_path)
                sha_path.write_text(sha + "\n")
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return tar_path, sha


def is_local_base(base_image: str) -> bool:
    return base_image in LOCAL_BASE_ALIASES


def import_local_base(client: Any, rootfs: Path, sha: str) -> None:
    """``docker import`` the cached rootfs as LOCAL_BASE_IMAGE (skipped when the same one is there)."""
    labels = _image_labels(client, LOCAL_BASE_IMAGE)
    if labels is not None and labels.get(LABEL_ROOTFS) == sha:
        return
    repository, tag = LOCAL_BASE_IMAGE.rsplit(":", 1)
    client.api.import_image_from_file(
        str(rootfs), repository=repository, tag=tag,
        changes=["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                 'CMD ["python3"]', f"LABEL {LABEL_ROOTFS}={sha}"],
    )


def _image_labels(client: Any, name: str) -> dict[str, str] | None:
    import docker.errors

    try:
        data = client.api.inspect_image(name)
    except docker.errors.ImageNotFound:
        return None
    return dict((data.get("Config") or {}).get("Labels") or {})

# --------------------------------------------------------------------------- hosts


@dataclass
class HostResult:
    host: str
    action: str = "present"  # present | built | loaded | updated (new runtimes code on the same deps)
    seconds: float = 0.0
    images: dict[str, int] = field(default_factory=dict)  # image -> size in bytes


@dataclass
class BuildReport:
    content_hash: str
    deps_image: str
    base_image: str
    hosts: list[HostResult] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    total_seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"runtime images {self.content_hash[:12]} on {self.deps_image} (base {self.base_image}): "
                 f"{self.total_seconds:.1f} s"]
        lines += [f"  {step}: {seconds:.1f} s" for step, seconds in self.steps.items()]
        for host in self.hosts:
            sizes = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in host.images.items())
            lines.append(f"  {host.host}: {host.action} in {host.seconds:.1f} s ({sizes})")
        return "\n".join(lines)


def _client_for(host: Any) -> tuple[Any, str, bool]:
    """(docker client, display name, whether we own the client)."""
    import docker

    if isinstance(host, str):
        return docker.DockerClient(base_url=host, timeout=600, version="auto"), host, True
    base_url = getattr(getattr(host, "api", None), "base_url", "docker")
    return host, str(base_url), False


def _has_images(client: Any, names: Iterable[str], digest: str) -> bool:
    for name in names:
        labels = _image_labels(client, name)
        if labels is None or labels.get(LABEL_CONTENT_HASH) != digest:
            return False
    return True


def _stream_build(client: Any, update: Callable[[str], None], what: str, **kwargs: Any) -> None:
    tail: list[str] = []
    for chunk in client.api.build(decode=True, rm=True, forcerm=True, pull=False, **kwargs):
        if "error" in chunk:
            raise ImageBuildError(f"{what}: {chunk['error'].strip()}\n" + "\n".join(tail[-20:]))
        line = str(chunk.get("stream") or chunk.get("status") or "").strip()
        if line:
            tail.append(line)
            update(line.splitlines()[-1])


def _ensure_base(client: Any, base_image: str, rootfs: tuple[Path, str] | None) -> str:
    """The base image's reference on this host (imported or pulled when missing)."""
    if rootfs is not None:
        import_local_base(client, *rootfs)
        return LOCAL_BASE_IMAGE
    if _image_labels(client, base_image) is None:
        repository, _, tag = base_image.partition(":")
        try:
            client.api.pull(repository, tag=tag or "latest")
        except Exception as exc:
            raise ImageBuildError(f"base image {base_image} is not on the host and cannot be pulled ({exc}); "
                                  f"without a registry use --base-image local (debootstrap)") from None
    return base_image


def _build_deps(client: Any, context: Path, base_ref: str, deps_image: str, digest: str,
                update: Callable[[str], None]) -> None:
    with open(context, "rb") as fh:
        _stream_build(client, update, f"building {deps_image}", fileobj=fh, custom_context=True,
                      tag=deps_image, buildargs={"BASE_IMAGE": base_ref},
                      labels={LABEL_CONTENT_HASH: digest, LABEL_RUNTIME: "deps"}, timeout=3600)


def _build_apps(client: Any, deps_image: str, digest: str, kinds: Sequence[str], sources: dict[str, bytes],
                update: Callable[[str], None]) -> None:
    for kind in kinds:
        context = app_context(deps_image, ENTRY_MODULES[kind], sources)
        _stream_build(client, update, f"building {RUNTIME_IMAGES[kind]}", fileobj=io.BytesIO(context),
                      custom_context=True, tag=RUNTIME_IMAGES[kind],
                      labels={LABEL_CONTENT_HASH: digest, LABEL_RUNTIME: kind})


def _save(client: Any, image: str, path: Path) -> None:
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as fh:
        for chunk in client.api.get_image(image, chunk_size=4 * 2**20):
            fh.write(chunk)
    partial.rename(path)


def _load(client: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        for item in client.api.load_image(fh) or []:
            if isinstance(item, dict) and item.get("error"):
                raise ImageBuildError(f"docker load: {item['error']}")


def _sizes(client: Any, names: Iterable[str]) -> dict[str, int]:
    return {name: int(client.api.inspect_image(name).get("Size") or 0) for name in names}


def build_runtime_images(hosts: Sequence[Any], *, base_image: str | None = None,
                         only: Sequence[str] | None = None, cache_dir: Path | None = None,
                         progress: bool = True, console: Any = None, force: bool = False) -> BuildReport:
    """Make the runtime images present on every host; returns what was done and how long it took.

    ``hosts``: Docker URLs (``tcp://...``, ``unix://...``, ``ssh://...``) or docker.DockerClient objects.
    ``base_image``: a registry image (default ``python:3.11-slim``; env MODELFLEET_BASE_IMAGE) or
    ``"local"`` for the debootstrap'ed base. ``only``: a subset of ("torch", "transformers").
    ``force``: rebuild everything even when the hosts have images with the same content hash.

    The dependencies image (~1.2 GB: torch, transformers, ...) is built once, on the first host
    that needs it, and kept as a ``docker save`` tarball in the cache; the other hosts, and fresh
    hosts later, ``docker load`` it. The runtime images (the runtimes' code and entry point on top)
    are built on each host in seconds, so a code change does not rebuild the dependencies.
    """
    t_start = time.monotonic()
    base_image = base_image or os.environ.get("MODELFLEET_BASE_IMAGE") or DEFAULT_BASE_IMAGE
    kinds = list(dict.fromkeys(only or RUNTIME_IMAGES))
    unknown = [k for k in kinds if k not in RUNTIME_IMAGES]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}: one of {', '.join(RUNTIME_IMAGES)}")
    if not hosts:
        raise ValueError("no Docker host to build on")
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    clients = [_client_for(h) for h in hosts]
    steps: dict[str, float] = {}
    try:
        with Reporter(console, progress) as reporter:
            t0 = time.monotonic()
            wheelhouse = ensure_wheelhouse(cache_dir, reporter)
            steps["wheelhouse"] = time.monotonic() - t0
            rootfs: tuple[Path, str] | None = None
            base_key = shown_base = base_image
            if is_local_base(base_image):
                t0 = time.monotonic()
                rootfs = ensure_rootfs(cache_dir, reporter)
                steps["base rootfs"] = time.monotonic() - t0
                base_key, shown_base = f"{LOCAL_BASE_IMAGE}@{rootfs[1]}", LOCAL_BASE_IMAGE
            sources = runtimes_sources()
            deps_digest = deps_hash(wheelhouse, base_key)
            deps_image = f"{DEPS_REPOSITORY}:{deps_digest[:12]}"
            digest = content_hash(deps_digest, sources)
            wanted = [RUNTIME_IMAGES[k] for k in kinds]
            report = BuildReport(digest, deps_image, shown_base, steps=steps)
            results = {name: HostResult(name) for _, name, _ in clients}
            missing = [(c, n) for c, n, _ in clients if force or not _has_images(c, wanted, digest)]
            need_deps = [(c, n) for c, n in missing if force or not _has_images(c, [deps_image], deps_digest)]
            saved = cache_dir / f"images-{deps_digest[:16]}.tar"

            if need_deps and (force or not saved.is_file()):
                # Build the dependencies once, on a host that needs them; keep them as a tarball.
                client, name = need_deps.pop(0)
                t0 = time.monotonic()
                with _cache_lock(cache_dir, "build"):
                    with reporter.step(f"{name}: base image {shown_base}"):
                        base_ref = _ensure_base(client, base_image, rootfs)
                    context = cache_dir / f"context-{deps_digest[:16]}.tar"
                    if not context.is_file():
                        with reporter.step("build context (wheelhouse)"):
                            write_deps_context(context, wheelhouse)
                    with reporter.step(f"{name}: docker build {deps_image} (pip install from the wheelhouse)") as upd:
                        _build_deps(client, context, base_ref, deps_image, deps_digest, upd)
                    with reporter.step(f"saving {deps_image} to {saved}"):
                        for old in cache_dir.glob("images-*.tar"):
                            old.unlink()
                        _save(client, deps_image, saved)
                    context.unlink(missing_ok=True)  # the saved image replaces it
                results[name].action = "built"
                results[name].seconds = time.monotonic() - t0
                steps["build dependencies"] = results[name].seconds

            def load_into(item: tuple[Any, str]) -> None:
                client, name = item
                t1 = time.monotonic()
                with reporter.step(f"{name}: docker load {saved.name}"):
                    _load(client, saved)
                results[name].action = "loaded"
                results[name].seconds += time.monotonic() - t1

            if need_deps:
                t0 = time.monotonic()
                with ThreadPoolExecutor(max_workers=min(4, len(need_deps))) as pool:
                    list(pool.map(load_into, need_deps))
                steps["load dependencies"] = time.monotonic() - t0

            def apps_on(item: tuple[Any, str]) -> None:
                client, name = item
                t1 = time.monotonic()
                with reporter.step(f"{name}: runtime images ({', '.join(kinds)})") as update:
                    _build_apps(client, deps_image, digest, kinds, sources, update)
                if results[name].action == "present":
                    results[name].action = "updated"
                results[name].seconds += time.monotonic() - t1

            if missing:
                t0 = time.monotonic()
                with ThreadPoolExecutor(max_workers=min(4, len(missing))) as pool:
                    list(pool.map(apps_on, missing))
                steps["runtime images"] = time.monotonic() - t0
            for client, name, _ in clients:
                results[name].images = _sizes(client, wanted)
            report.hosts = [results[name] for _, name, _ in clients]
    finally:
        for client, _, owned in clients:
            if owned:
                with contextlib.suppress(Exception):
                    client.close()
    report.total_seconds = time.monotonic() - t_start
    return report
