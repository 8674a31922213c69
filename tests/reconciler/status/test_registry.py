"""The status-provider registry: the names the config accepts, and the writer the daemon builds."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelfleet.reconciler.config import ConfigError, StatusSettings, parse_config
from modelfleet.reconciler.daemon.service import make_status_writer
from modelfleet.reconciler.status import CommitStatus, registry
from modelfleet.reconciler.status.forges import GiteaWriter, GitHubWriter, GitLabWriter
from modelfleet.reconciler.status.git_notes import GitNotesWriter

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class RecordingWriter:
    settings: StatusSettings
    repo_path: str
    repo_url: str | None
    published: list[tuple[str, list[CommitStatus]]] = field(default_factory=list)

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        self.published.append((revision, statuses))


def recording_writer(settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> RecordingWriter:
    return RecordingWriter(settings, repo_path, repo_url)


def daemon_with_clone(path: Path) -> Any:
    return SimpleNamespace(source=SimpleNamespace(path=path))


def test_the_config_contract_names_the_registered_providers() -> None:
    assert registry.provider_names() == ("git-notes", "gitea", "github", "gitlab", "none")
    assert StatusSettings().provider == "git-notes"
    for name in registry.provider_names():
        assert parse_config(f"status: {{provider: {name}}}\n").status.provider == name


@pytest.mark.parametrize("name", registry.provider_names())
def test_every_registered_factory_resolves(name: str) -> None:
    assert callable(registry.factory(name))


def test_a_registered_provider_is_selectable_from_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(registry.PROVIDERS, "recorder", f"{__name__}:recording_writer")
    config = parse_config("repo: {url: 'https://git.example.com/acme/models.git'}\n"
                          "status: {provider: recorder, url: 'https://status.example.com', push: false}\n")

    writer = make_status_writer(config, daemon_with_clone(tmp_path / "repo"))

    assert isinstance(writer, RecordingWriter)
    assert writer.settings is config.status and writer.settings.url == "https://status.example.com"
    assert writer.repo_path == str(tmp_path / "repo")
    assert writer.repo_url == "https://git.example.com/acme/models.git"


def test_an_unknown_provider_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as failure:
        parse_config("repo: {branch: main}\nstatus:\n  provider: bitbucket\n", "fleet.yaml")
    (error,) = failure.value.errors
    assert (error.file, error.line, error.field) == ("fleet.yaml", 3, "status.provider")
    assert "'bitbucket'" in str(error)
    for name in registry.provider_names():
        assert repr(name) in str(error)


def test_an_unregistered_provider_is_refused_once_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(registry.PROVIDERS, "gitlab")
    with pytest.raises(ConfigError, match=r"'gitlab' is not allowed \(use one of 'git-notes', 'gitea', 'github' or "
                                          r"'none'\)"):
        parse_config("status: {provider: gitlab}\n")
    with pytest.raises(ValueError, match=r"unknown status provider 'gitlab'.*'git-notes', 'gitea', 'github' or 'none'"):
        registry.factory("gitlab")


def test_a_provider_that_is_not_text_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"status\.provider: 3 is not allowed"):
        parse_config("status: {provider: 3}\n")


def test_the_daemon_builds_the_configured_writer(tmp_path: Path) -> None:
    token = tmp_path / "status-token"
    token.write_text("tok-123\n")
    daemon = daemon_with_clone(tmp_path / "clone")

    assert make_status_writer(parse_config("status: {provider: none}\n"), daemon) is None

    notes = make_status_writer(parse_config("status: {provider: git-notes, push: false}\n"), daemon)
    assert isinstance(notes, GitNotesWriter)
    assert (notes.repo_path, notes.remote, notes.push) == (str(tmp_path / "clone"), "origin", False)

    kinds: list[tuple[str, type[GiteaWriter | GitHubWriter | GitLabWriter]]] = [
        ("gitea", GiteaWriter), ("github", GitHubWriter), ("gitlab", GitLabWriter)]
    for provider, kind in kinds:
        config = parse_config(f"repo: {{url: 'https://git.example.com/acme/models.git'}}\n"
                              f"status: {{provider: {provider}, tokenFile: {token}}}\n")
        writer = make_status_writer(config, daemon)
        assert isinstance(writer, kind) and writer.target == "acme/models"


def test_reading_the_config_imports_no_provider_module() -> None:
    """Config validation takes the names from the registry only: no HTTP or Git client is loaded."""
    probe = ("import json, sys\n"
             "from modelfleet.reconciler.config import parse_config\n"
             "for name in ('git-notes', 'gitea', 'github', 'gitlab', 'none'):\n"
             "    parse_config('status: {provider: %s}' % name)\n"
             "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                          cwd=ROOT)
    modules = json.loads(done.stdout)
    heavy = ("httpx", "git", "gitdb", "docker", "modelfleet.reconciler.status.forges",
             "modelfleet.reconciler.status.git_notes")
    assert [m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)] == []
