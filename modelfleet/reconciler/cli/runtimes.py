"""``modelfleet runtimes build``: make the runtime images on Docker hosts (no registry needed).

    modelfleet runtimes build [--host DOCKER_URL ...] [--config CFG] [--base-image IMAGE]
                              [--only torch|transformers] [--cache-dir DIR] [--force] [--json]

Hosts: every ``--host``, else every host of ``--config``'s pool, else $DOCKER_HOST (or the local
socket). ``--base-image local`` makes the Python base with debootstrap (no registry); the default
is ``python:3.11-slim`` from a registry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3


def add_runtimes_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``runtimes`` (with its ``build`` verb) on the main CLI's subparsers."""
    from modelfleet.reconciler.images.content import DEFAULT_BASE_IMAGE, RUNTIME_IMAGES

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "runtimes", help="build the runtime images (torch, transformers) on the Docker hosts")
    verbs = parser.add_subparsers(dest="runtimes_command", required=True, metavar="VERB")
    build = verbs.add_parser("build", help="build modelfleet/runtime-torch and modelfleet/runtime-transformers",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--host", action="append", default=[], metavar="DOCKER_URL",
                       help="a Docker host (tcp://, unix://, ssh://); repeatable")
    build.add_argument("--config", help="daemon config: build on every host of its pool")
    build.add_argument("--base-image", default=None,
                       help=f"base image (build argument BASE_IMAGE), default {DEFAULT_BASE_IMAGE}; "
                            f"'local' = debootstrap'ed Debian bookworm, no registry needed")
    build.add_argument("--only", action="append", choices=sorted(RUNTIME_IMAGES), default=None,
                       help="build only this runtime's image (repeatable)")
    build.add_argument("--cache-dir", default=None,
                       help="cache for the rootfs, wheelhouse and saved image ($MODELFLEET_CACHE_DIR, "
                            "default /var/cache/modelfleet)")
    build.add_argument("--force", action="store_true", help="rebuild even when the images are up to date")
    build.add_argument("--json", action="store_true", help="print the build report as JSON")
    build.set_defaults(func=cmd_runtimes)
    return parser


def _hosts_from_config(path: str) -> list[Any]:
    from modelfleet.reconciler.config import load_config

    config = load_config(path)
    hosts: list[Any] = []
    for host in config.pool.hosts:
        if host.tls is None:
            hosts.append(host.url)
        else:  # reuse the pool adapter's TLS/SSH handling
            from modelfleet.reconciler.pool.adapter import HostClient

            hosts.append(HostClient(host, timeout=600)._docker())
    return hosts


def cmd_runtimes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from modelfleet.reconciler.images.build import ImageBuildError, build_runtime_images

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if getattr(args, "runtimes_command", None) != "build":
        err.print("usage: modelfleet runtimes build [--host DOCKER_URL ...]")
        return EXIT_USAGE
    try:
        hosts: list[Any] = list(args.host)
        if not hosts and args.config:
            hosts = _hosts_from_config(args.config)
        if not hosts:
            hosts = [os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"]
    except Exception as exc:  # config errors
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_INVALID
    try:
        report = build_runtime_images(hosts, base_image=args.base_image, only=args.only,
                                      cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                                      console=err, progress=True, force=args.force)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    except ImageBuildError as exc:
        err.print(f"[red]image build failed:[/red] {exc}")
        return EXIT_RUNTIME
    except Exception as exc:  # Docker/network errors
        err.print(f"[red]image build failed:[/red] {type(exc).__name__}: {exc}")
        return EXIT_RUNTIME
    if args.json:
        payload = {
            "content_hash": report.content_hash, "deps_image": report.deps_image,
            "base_image": report.base_image, "total_seconds": round(report.total_seconds, 2),
            "steps": {k: round(v, 2) for k, v in report.steps.items()},
            "hosts": [{"host": h.host, "action": h.action, "seconds": round(h.seconds, 2), "images": h.images}
                      for h in report.hosts],
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        err.print(report.summary(), markup=False)
    return EXIT_OK
