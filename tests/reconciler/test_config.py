"""Paths in the daemon config (`modelfleet.yaml`) are relative to the config file's directory: every one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from modelfleet.reconciler.config import Config, load_config, parse_config, path_marker

HOST = ("pool:\n  hosts:\n    - name: par-1\n      url: tcp://10.0.0.2:2376\n"
        "      location: {name: paris-1, country: FR, continent: EU}\n"
        "      flavors: [{name: amd-genoa}]\n      capacity: {cpus: 8, memory: 32Gi}\n")


def with_tls(tls: str) -> str:
    return HOST + f"      tls: {tls}\n"


PATH_FIELDS: list[tuple[str, str, Callable[[Config], str | None], str]] = [
    # the field (YAML names; [] = every item), a config setting it relative, how to read it, the relative value
    ("stateDir", "stateDir: state\n", lambda c: c.state_dir, "state"),
    ("repo.url", "repo: {url: git/models.git}\n", lambda c: c.repo.url, "git/models.git"),
    ("repo.webhookSecretFile", "repo: {webhookSecretFile: secrets/webhook}\n",
     lambda c: c.repo.webhook_secret_file, "secrets/webhook"),
    ("gateway.tokenFile", "gateway: {tokenFile: secrets/gateway}\n", lambda c: c.gateway.token_file,
     "secrets/gateway"),
    ("gateway.controlPlaneTokenFile", "gateway: {controlPlaneTokenFile: secrets/api}\n",
     lambda c: c.gateway.control_plane_token_file, "secrets/api"),
    ("gateway.cacheDir", "gateway: {follow: controlPlane, cacheDir: cache/gateway}\n",
     lambda c: c.gateway.cache_dir, "cache/gateway"),
    ("api.tokenFile", "api: {tokenFile: secrets/api}\n", lambda c: c.api.token_file, "secrets/api"),
    ("status.tokenFile", "status: {provider: gitea, tokenFile: secrets/forge}\n", lambda c: c.status.token_file,
     "secrets/forge"),
    ("integrations.huggingface.tokenFile", "integrations: {huggingface: {tokenFile: secrets/hf}}\n",
     lambda c: c.integrations.huggingface.token_file, "secrets/hf"),
    ("pool.hosts[].tls.ca", with_tls("{ca: tls/ca.pem}"), lambda c: _tls(c).ca, "tls/ca.pem"),
    ("pool.hosts[].tls.cert", with_tls("{cert: tls/cert.pem, key: /abs/key.pem}"), lambda c: _tls(c).cert,
     "tls/cert.pem"),
    ("pool.hosts[].tls.key", with_tls("{cert: /abs/cert.pem, key: ./tls/key.pem}"), lambda c: _tls(c).key,
     "tls/key.pem"),
]


def _tls(config: Config) -> Any:
    tls = config.pool.hosts[0].tls
    assert tls is not None
    return tls


def _models_in(annotation: Any, suffix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield suffix, annotation
        return
    inner = "[]" if get_origin(annotation) in (list, tuple, dict) else ""
    for arg in get_args(annotation):
        yield from _models_in(arg, suffix + inner)


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of the config, at any depth, by its dotted YAML name."""
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        yield key, field
        for suffix, nested in _models_in(field.annotation):
            yield from config_fields(nested, f"{key}{suffix}.")


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "etc" / "modelfleet"
    directory.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the config file, not to where the daemon is started
    return directory


@pytest.mark.parametrize(("field", "yaml", "read", "relative"), PATH_FIELDS, ids=[row[0] for row in PATH_FIELDS])
def test_each_path_field_is_relative_to_the_config_file(config_dir: Path, field: str, yaml: str,
                                                        read: Callable[[Config], str | None], relative: str) -> None:
    (config_dir / "modelfleet.yaml").write_text(yaml)
    config = load_config(config_dir / "modelfleet.yaml")
    assert read(config) == str(config_dir / relative)


def test_every_path_field_of_the_config_is_tested_above() -> None:
    marked = {key for key, field in config_fields() if path_marker(field) is not None}
    assert marked == {row[0] for row in PATH_FIELDS}


def test_every_field_that_looks_like_a_path_is_marked_as_one() -> None:
    # A new `somethingFile` or `somethingDir` without the ConfigPath mark would be read from the cwd.
    looks_like_a_path = {key for key, _ in config_fields()
                         if key.endswith(("File", "Dir", "Path"))
                         or (key.startswith("pool.hosts[].tls.") and not key.endswith(".verify"))}
    unmarked = {key for key, field in config_fields() if key in looks_like_a_path and path_marker(field) is None}
    assert looks_like_a_path and unmarked == set()


@pytest.mark.parametrize(("yaml", "read", "expected"), [
    ("repo: {url: 'https://git.example.com/org/models.git'}\n", lambda c: c.repo.url,
     "https://git.example.com/org/models.git"),
    ("repo: {url: 'git@git.example.com:org/models.git'}\n", lambda c: c.repo.url, "git@git.example.com:org/models.git"),
    ("repo: {url: /srv/git/models.git}\n", lambda c: c.repo.url, "/srv/git/models.git"),
    ("stateDir: ~/modelfleet\n", lambda c: c.state_dir, "~/modelfleet"),
    ("api: {tokenFile: /etc/modelfleet/api}\n", lambda c: c.api.token_file, "/etc/modelfleet/api"),
    (with_tls("{ca: /etc/docker/ca.pem}"), lambda c: _tls(c).ca, "/etc/docker/ca.pem"),
    ("gateway: {tokenFile: null}\n", lambda c: c.gateway.token_file, None),
])
def test_absolute_paths_urls_and_unset_fields_stay_as_written(config_dir: Path, yaml: str,
                                                              read: Callable[[Config], str | None],
                                                              expected: str | None) -> None:
    (config_dir / "modelfleet.yaml").write_text(yaml)
    assert read(load_config(config_dir / "modelfleet.yaml")) == expected


def test_every_host_gets_its_tls_files_resolved(config_dir: Path) -> None:
    second = ("    - name: fra-1\n      url: tcp://10.0.0.3:2376\n      tls: {ca: fra/ca.pem, verify: false}\n"
              "      location: {name: frankfurt-1, country: DE, continent: EU}\n"
              "      flavors: [{name: amd-genoa}]\n      capacity: {cpus: 8, memory: 32Gi}\n"
              "    - name: local\n      url: unix:///var/run/docker.sock\n"
              "      location: {name: paris-1, country: FR, continent: EU}\n"
              "      flavors: [{name: amd-genoa}]\n      capacity: {cpus: 8, memory: 32Gi}\n")
    (config_dir / "modelfleet.yaml").write_text(with_tls("{ca: par/ca.pem}") + second)
    hosts = load_config(config_dir / "modelfleet.yaml").pool.hosts
    assert [h.tls.ca if h.tls else None for h in hosts] == [
        str(config_dir / "par/ca.pem"), str(config_dir / "fra/ca.pem"), None]
    assert hosts[1].tls is not None and hosts[1].tls.verify is False  # the rest of the host is untouched
    assert hosts[0].capacity.describe() == "8 cpus / 32Gi"


def test_parse_config_without_a_directory_keeps_paths_as_written() -> None:
    config = parse_config("stateDir: state\n" + with_tls("{ca: tls/ca.pem}"))
    assert config.state_dir == "state" and _tls(config).ca == "tls/ca.pem"
