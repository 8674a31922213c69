"""What the runtime images are made of, and its hash: the only inputs of their content.

Names and labels of the images, the pinned requirements, the two Dockerfiles, the files of
``modelfleet.runtimes`` copied into them, and the hashes over exactly those (plus the wheel names
and the base image). The build code (``build``, ``progress``) is not part of any hash: editing it
does not make the hosts rebuild their images.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import modelfleet.runtimes
from modelfleet.runtimes import RUNTIME_VERSION
from modelfleet.runtimes.contract import DEFAULT_PORT

IMAGE_TORCH = f"modelfleet/runtime-torch:{RUNTIME_VERSION}"
IMAGE_TRANSFORMERS = f"modelfleet/runtime-transformers:{RUNTIME_VERSION}"
RUNTIME_IMAGES: dict[str, str] = {"torch": IMAGE_TORCH, "transformers": IMAGE_TRANSFORMERS}
ENTRY_MODULES: dict[str, str] = {
    "torch": "modelfleet.runtimes.torch_server",
    "transformers": "modelfleet.runtimes.transformers_server",
}
DEPS_REPOSITORY = "modelfleet/runtime-deps"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
LABEL_CONTENT_HASH = "modelfleet.runtime.content-hash"
LABEL_RUNTIME = "modelfleet.runtime"
RUNTIME_USER = "65534:65534"
RUNTIME_PORT = DEFAULT_PORT

# What the images install (exact pins: reproducible images, stable content hash). Transitive
# dependencies are resolved once per wheelhouse.
REQUIREMENTS = """\
torch==2.13.0
torchserve==0.12.0
transformers==5.24.0
tokenizers==0.23.3
safetensors==0.8.0
huggingface-hub==2.4.0
diffusers==0.42.1
numpy==2.4.6
pillow==13.0.0
pyyaml==6.0.4
starlette==1.10.0
uvicorn==0.54.0
httptools==0.9.0
uvloop==0.23.0
python-multipart==0.0.34
"""

# Classic builder (the Docker API's default; no BuildKit needed). The dependencies image: a venv
# from the wheelhouse, trimmed (headers, test binaries, TorchServe's Java frontend), copied into a
# clean stage (no wheels in the image). It changes only with the pins or the base image.
DEPS_DOCKERFILE = """\
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS build
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/modelfleet \\
 && /opt/modelfleet/bin/pip install --no-index --find-links /tmp/wheels --no-cache-dir \\
        --disable-pip-version-check -r /tmp/wheels/requirements.txt \\
 && SP=$(/opt/modelfleet/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \\
 && rm -rf "$SP/torch/include" "$SP/ts/frontend" \\
 && find "$SP/torch/bin" -type f ! -name torch_shm_manager -delete \\
 && find "$SP/torch/lib" -name '*test*.so' -delete \\
 && /opt/modelfleet/bin/python -c "import torch, ts.context, transformers, starlette, uvicorn" \\
 && /opt/modelfleet/bin/pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true

FROM ${BASE_IMAGE}
COPY --from=build /opt/modelfleet /opt/modelfleet
ENV PATH=/opt/modelfleet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONPATH=/opt/modelfleet/app \\
    PYTHONUNBUFFERED=1 \\
    PYTHONDONTWRITEBYTECODE=1 \\
    HOME=/tmp \\
    HF_HOME=/tmp/hf \\
    HF_HUB_OFFLINE=1 \\
    TRANSFORMERS_OFFLINE=1 \\
    MODEL_DIR=/model \\
    MODELFLEET_WORK_DIR=/tmp \\
    PORT=8080
WORKDIR /tmp
USER 65534:65534
EXPOSE 8080
"""

# A runtime image: the dependencies image + the runtimes package + the entry point. Seconds to
# build on each host; the two runtimes share every layer but the entry point.
APP_DOCKERFILE = """\
FROM {deps_image}
USER 0:0
COPY app /opt/modelfleet/app
RUN /opt/modelfleet/bin/python -m compileall -q /opt/modelfleet/app \\
 && /opt/modelfleet/bin/python -c "import modelfleet.runtimes.torch_server, modelfleet.runtimes.transformers_server"
USER 65534:65534
ENTRYPOINT ["/opt/modelfleet/bin/python", "-m", "{module}"]
"""


def runtimes_sources(package: Path | None = None) -> dict[str, bytes]:
    """The modelfleet.runtimes package (``relative path -> bytes``), as copied into the images.

    ``package``: the package directory (default: the installed ``modelfleet.runtimes``).
    """
    package = package or Path(modelfleet.runtimes.__file__).resolve().parent
    files = {f"modelfleet/runtimes/{p.relative_to(package).as_posix()}": p.read_bytes()
             for p in sorted(package.rglob("*.py")) if "__pycache__" not in p.parts}
    # A bare modelfleet package: the rest of modelfleet (and its dependencies) is not in the image.
    files["modelfleet/__init__.py"] = b'"""modelfleet runtimes only (inside a runtime image)."""\n'
    return files


def deps_hash(wheelhouse: Path, base_key: str) -> str:
    """What the dependencies image is made of: Dockerfile, pins, wheels, base image."""
    digest = hashlib.sha256()
    for part in (DEPS_DOCKERFILE, REQUIREMENTS, base_key):
        digest.update(part.encode() + b"\0")
    for wheel in sorted(p.name for p in wheelhouse.glob("*.whl")):
        digest.update(wheel.encode() + b"\0")
    return digest.hexdigest()


def content_hash(deps: str, sources: dict[str, bytes] | None = None) -> str:
    """What the runtime images are made of: the dependencies image (``deps_hash``), the runtime
    images' Dockerfile and user, and the runtimes' sources. Nothing of the build code itself."""
    sources = sources if sources is not None else runtimes_sources()
    digest = hashlib.sha256()
    for part in (deps, APP_DOCKERFILE, RUNTIME_USER):
        digest.update(part.encode() + b"\0")
    for name, data in sorted(sources.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _tar_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_deps_context(path: Path, wheelhouse: Path) -> None:
    """The dependencies build context: Dockerfile and wheels/ (+ requirements.txt)."""
    partial = path.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        _tar_bytes(tar, "Dockerfile", DEPS_DOCKERFILE.encode())
        _tar_bytes(tar, "wheels/requirements.txt", REQUIREMENTS.encode())
        for wheel in sorted(wheelhouse.glob("*.whl")):
            tar.add(wheel, arcname=f"wheels/{wheel.name}", recursive=False, filter=_reset)
    partial.rename(path)


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def app_context(deps_image: str, module: str, sources: dict[str, bytes]) -> bytes:
    """A runtime image's build context: its Dockerfile and app/ (the runtimes package)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _tar_bytes(tar, "Dockerfile", APP_DOCKERFILE.format(deps_image=deps_image, module=module).encode())
        for name, data in sorted(sources.items()):
            _tar_bytes(tar, f"app/{name}", data)
    return buf.getvalue()
