"""The image build's pure parts (hashes, contexts, the Dockerfile contract) and the CLI wiring.

The build on real Docker hosts is tested in tests/integration/test_runtimes.py.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import modelfleet
from modelfleet.reconciler.cli.runtimes import EXIT_RUNTIME, add_runtimes_parser, cmd_runtimes
from modelfleet.reconciler.images import build
from modelfleet.reconciler.images import content as images
from modelfleet.runtimes import contract
from modelfleet.state.runtimes import DEFAULT_IMAGES, DEFAULT_PORTS, MODEL_MOUNT


def test_image_names_match_the_state_defaults() -> None:
    assert {k: DEFAULT_IMAGES[k] for k in ("torch", "transformers")} == images.RUNTIME_IMAGES
    assert images.RUNTIME_PORT == DEFAULT_PORTS["torch"] == DEFAULT_PORTS["transformers"] == contract.DEFAULT_PORT
    assert MODEL_MOUNT == contract.DEFAULT_MODEL_DIR
    assert f"MODEL_DIR={MODEL_MOUNT}" in images.DEPS_DOCKERFILE
    assert "USER 65534:65534" in images.DEPS_DOCKERFILE and "USER 65534:65534" in images.APP_DOCKERFILE
    assert "ARG BASE_IMAGE=python:3.11-slim" in images.DEPS_DOCKERFILE
    assert "--no-index" in images.DEPS_DOCKERFILE
    assert "torch==2.13.0\n" in images.REQUIREMENTS


def test_sources_are_the_runtimes_package_alone() -> None:
    sources = images.runtimes_sources()
    assert "modelfleet/runtimes/torch_server.py" in sources
    assert "modelfleet/runtimes/transformers_server.py" in sources
    assert all(name.startswith("modelfleet/runtimes/") or name == "modelfleet/__init__.py" for name in sources)
    # Importable without the rest of modelfleet: no import of modelfleet.state/reconciler.
    for name, data in sources.items():
        text = data.decode()
        assert "modelfleet.state" not in text and "modelfleet.reconciler" not in text, name


def test_sources_are_exactly_the_runtimes_package_files() -> None:
    package = Path(contract.__file__).resolve().parent
    expected = {f"modelfleet/runtimes/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
                if "__pycache__" not in p.parts}
    assert set(images.runtimes_sources()) == expected | {"modelfleet/__init__.py"}
    assert "modelfleet/runtimes/contract.py" in expected
    # The build code lives elsewhere and is not copied into the images.
    assert not any("images" in name or "reconciler" in name for name in images.runtimes_sources())


_HASH_SCRIPT = """
from modelfleet.reconciler.images.content import content_hash, runtimes_sources
print(content_hash("deps", runtimes_sources()))
"""


def _content_hash_of_tree(root: Path) -> str:
    """The runtime images' content hash as the modelfleet code under ``root`` computes it."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], env=env, cwd=root, capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_editing_the_build_code_keeps_the_hash_and_editing_a_server_changes_it(tmp_path: Path) -> None:
    """A change of the progress display or the build steps must not rebuild the images on every host."""
    tree = tmp_path / "src"
    shutil.copytree(Path(modelfleet.__file__).resolve().parent, tree / "modelfleet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = _content_hash_of_tree(tree)
    assert before == images.content_hash("deps", images.runtimes_sources())  # the copy is faithful

    for build_file in ("progress.py", "build.py"):
        path = tree / "modelfleet" / "reconciler" / "images" / build_file
        path.write_text(path.read_text() + "\n# an edit of the build code\n")
    assert _content_hash_of_tree(tree) == before

    server = tree / "modelfleet" / "runtimes" / "torch_server.py"
    server.write_text(server.read_text() + "\n# an edit of a runtime server\n")
    assert _content_hash_of_tree(tree) != before


def test_hashes_follow_their_inputs(tmp_path: Path) -> None:
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"x")
    deps = images.deps_hash(tmp_path, "python:3.11-slim")
    assert deps == images.deps_hash(tmp_path, "python:3.11-slim")
    assert deps != images.deps_hash(tmp_path, "modelfleet/python-base:bookworm@abc")
    (tmp_path / "b-2.0-py3-none-any.whl").write_bytes(b"x")
    assert deps != images.deps_hash(tmp_path, "python:3.11-slim")
    sources = {"modelfleet/runtimes/x.py": b"a = 1\n"}
    content = images.content_hash(deps, sources)
    assert content != images.content_hash(deps, {"modelfleet/runtimes/x.py": b"a = 2\n"})
    assert content != images.content_hash("other", sources)


def test_contexts(tmp_path: Path) -> None:
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"wheel")
    context = tmp_path / "ctx.tar"
    images.write_deps_context(context, tmp_path)
    with tarfile.open(context) as tar:
        names = tar.getnames()
        assert tar.extractfile("Dockerfile").read().decode() == images.DEPS_DOCKERFILE  # type: ignore[union-attr]
        assert all(m.uid == 0 and m.mtime == 0 for m in tar.getmembers())
    assert "wheels/requirements.txt" in names
    assert "wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl" in names
    app = images.app_context("modelfleet/runtime-deps:abc", images.ENTRY_MODULES["torch"],
                             {"modelfleet/__init__.py": b""})
    with tarfile.open(fileobj=io.BytesIO(app)) as tar:
        dockerfile = tar.extractfile("Dockerfile").read().decode()  # type: ignore[union-attr]
        assert tar.getnames() == ["Dockerfile", "app/modelfleet/__init__.py"]
    assert dockerfile.startswith("FROM modelfleet/runtime-deps:abc\n")
    assert '"-m", "modelfleet.runtimes.torch_server"]' in dockerfile


def test_platform_tags_cover_bookworm_glibc() -> None:
    tags = build._platform_tags()
    assert any(t.startswith("manylinux_2_28_") for t in tags) and any(t.startswith("manylinux2014_") for t in tags)
    assert not any(t.startswith("manylinux_2_37") for t in tags)  # bookworm has glibc 2.36


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelfleet")
    add_runtimes_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_arguments() -> None:
    args = parse(["runtimes", "build", "--host", "tcp://a:2375", "--host", "tcp://b:2375", "--base-image", "local",
                  "--only", "torch"])
    assert args.host == ["tcp://a:2375", "tcp://b:2375"]
    assert (args.base_image, args.only, args.func) == ("local", ["torch"], cmd_runtimes)
    with pytest.raises(SystemExit):
        parse(["runtimes", "build", "--only", "tgi"])


def test_cli_unreachable_host_is_a_runtime_failure(tmp_path: Path) -> None:
    args = parse(["runtimes", "build", "--host", "tcp://127.0.0.1:1", "--cache-dir", str(tmp_path)])
    assert cmd_runtimes(args) == EXIT_RUNTIME
