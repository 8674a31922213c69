"""`modelfleet release`: promotion of a pinned origin and runtime in a real git clone; its errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from modelfleet.reconciler.cli.main import main
from modelfleet.reconciler.cli.release import ReleaseError, edit_deployment, release

GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "t@localhost", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
COMMIT = "a" * 40
ARCHIVE = b"not really a mar, but bytes with a digest"
DIGEST = hashlib.sha256(ARCHIVE).hexdigest()
OLD = "b" * 64

ENVIRONMENTS = """\
apiVersion: modelfleet.dev/v1alpha1
kind: Environment
metadata: {name: production}
---
apiVersion: modelfleet.dev/v1alpha1
kind: Environment
metadata: {name: development}
---
apiVersion: modelfleet.dev/v1alpha1
kind: Policy
metadata: {name: eu-only}
spec:
  type: location
  locations: [{type: continent, name: EU}]
"""

CLASSIFIER = f"""\
# The classifier: a comment users care about.
apiVersion: modelfleet.dev/v1alpha1
kind: Model
metadata:
  name: tiny-classifier
spec:
  deployments:
    - environment: production
      # production keeps its own policies and replicas
      policies: [eu-only]
      origin:
        file: {{sha256: "sha256:{OLD}"}}   # the old archive
      replicas: 3
      runtime:
        type: torch
        resources: {{cpus: 1, memory: 1Gi}}
      # a trailing comment of production
    - environment: development
      origin:
        file: {{path: models/tiny-classifier.mar}}
      runtime:
        type: torch
        env: {{LOG_LEVEL: debug}}
        resources: {{cpus: 2, memory: 2Gi}}
      serverless: {{minReplicas: 0, maxReplicas: 2}}
---
# another document, untouched
apiVersion: modelfleet.dev/v1alpha1
kind: Model
metadata: {{name: other}}
spec:
  deployments:
    - {{environment: production, runtime: {{type: custom, image: "x:1"}}}}
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", "-q", str(origin), str(work))
    (work / "models").mkdir()
    (work / "environments.yaml").write_text(ENVIRONMENTS)
    (work / "models" / "tiny-classifier.yaml").write_text(CLASSIFIER)
    (work / "models" / "tiny-classifier.mar").write_bytes(ARCHIVE)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "initial")
    git(work, "push", "-q", "origin", "main")
    return work


def _deployment(path: Path, model: str, environment: str) -> dict[str, object]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["metadata"]["name"] == model:
            return next(d for d in doc["spec"]["deployments"] if d["environment"] == environment)
    raise AssertionError(model)


def _commit(work: Path, model: str, doc: str) -> None:
    (work / "models" / f"{model}.yaml").write_text(doc)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", f"add {model}")


def test_release_copies_the_pinned_file_origin_and_runtime_and_keeps_the_rest(
        clone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    before = (clone / "models" / "tiny-classifier.yaml").read_text()
    released = release(clone, "tiny-classifier", "development", "production")
    path = clone / "models" / "tiny-classifier.yaml"
    production = _deployment(path, "tiny-classifier", "production")
    # The origin as pinned (the archive's sha256, not its path) and the runtime of development...
    assert production["origin"] == {"file": {"sha256": f"sha256:{DIGEST}"}}
    assert production["runtime"] == {"type": "torch", "env": {"LOG_LEVEL": "debug"},
                                     "resources": {"cpus": 2, "memory": "2Gi"}}
    # ...but production's own policies and replicas, and never development's serverless.
    assert production["policies"] == ["eu-only"] and production["replicas"] == 3
    assert "serverless" not in production
    assert _deployment(path, "tiny-classifier", "development")["origin"] == {
        "file": {"path": "models/tiny-classifier.mar"}}
    text = path.read_text()
    # Every other line as it was: comments, the development deployment, the other document.
    for line in ("# The classifier: a comment users care about.", "      # production keeps its own policies and "
                 "replicas", "      # a trailing comment of production", "# another document, untouched",
                 '    - {environment: production, runtime: {type: custom, image: "x:1"}}'):
        assert line in text
    assert before.split("    - environment: development")[1] == text.split("    - environment: development")[1]
    assert OLD not in text
    # One commit, of that file, saying what was promoted.
    assert released.message == (f"release tiny-classifier: development -> production (origin "
                                f"sha256:{DIGEST[:12]}..., runtime torch)")
    assert git(clone, "log", "-1", "--format=%s") == released.message
    assert git(clone, "show", "--name-only", "--format=", "HEAD") == "models/tiny-classifier.yaml"
    assert git(clone, "status", "--porcelain") == ""
    assert released.branch is None and not released.pushed


def test_release_push_makes_a_release_branch_on_the_remote(clone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    released = release(clone, "tiny-classifier", "development", "production", push=True)
    assert released.branch == f"release/tiny-classifier-production-{DIGEST[:8]}"
    remote = git(clone, "ls-remote", "origin", f"refs/heads/{released.branch}")
    assert remote.split()[0] == released.commit
    # main on the remote is untouched: the branch is for review (a merge deploys it).
    assert git(clone, "rev-parse", "origin/main") != released.commit


def test_a_huggingface_origin_is_copied_as_its_commit(clone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    _commit(clone, "minilm", textwrap.dedent("""\
        apiVersion: modelfleet.dev/v1alpha1
        kind: Model
        metadata: {name: minilm}
        spec:
          deployments:
            - environment: production
              origin: {huggingface: {model: org/minilm, revision: v1.0}}
            - environment: development
              origin:
                huggingface: {model: org/minilm, revision: main}  # follows main
        """))
    with pytest.raises(ReleaseError) as error:
        release(clone, "minilm", "development", "production")
    message = str(error.value)
    assert "models/minilm.yaml:10" in message and "'main'" in message and "pin it" in message
    assert "--config/--api" in message
    # The commit the daemon deployed (its status), when it can be asked.
    released = release(clone, "minilm", "development", "production", deployed_commit=COMMIT)
    production = _deployment(clone / "models" / "minilm.yaml", "minilm", "production")
    assert production["origin"] == {"huggingface": {"model": "org/minilm", "revision": COMMIT}}
    assert "origin hf:org/minilm@aaaaaaaaaaaa" in released.message
    # Flow style stays flow style, on its line.
    assert f"origin: {{huggingface: {{model: org/minilm, revision: {COMMIT}}}}}" in (
        clone / "models" / "minilm.yaml").read_text()


def test_a_pinned_revision_is_copied_without_asking_the_daemon(clone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    _commit(clone, "minilm", textwrap.dedent(f"""\
        apiVersion: modelfleet.dev/v1alpha1
        kind: Model
        metadata: {{name: minilm}}
        spec:
          deployments:
            - {{environment: production, origin: {{huggingface: {{model: org/minilm}}}}}}
            - environment: development
              origin: {{huggingface: {{model: org/minilm, revision: {COMMIT}}}}}
              runtime: {{type: transformers}}
        """))
    release(clone, "minilm", "development", "production")
    production = _deployment(clone / "models" / "minilm.yaml", "minilm", "production")
    assert production == {"environment": "production", "runtime": {"type": "transformers"},
                          "origin": {"huggingface": {"model": "org/minilm", "revision": COMMIT}}}


@pytest.mark.parametrize(("model", "source", "target", "expected"), [
    ("nope", "development", "production", "no Model named 'nope'"),
    ("tiny-classifier", "staging", "production", "models/tiny-classifier.yaml:2: model tiny-classifier has no "
                                                  "deployment in environment 'staging'"),
    ("tiny-classifier", "development", "staging", "models/tiny-classifier.yaml:2: model tiny-classifier has no "
                                                  "deployment in environment 'staging'"),
    ("tiny-classifier", "production", "production", "--from and --to are both 'production'"),
])
def test_promoting_what_does_not_exist_is_a_clear_error(clone: Path, model: str, source: str, target: str,
                                                        expected: str) -> None:
    before = git(clone, "rev-parse", "HEAD")
    with pytest.raises(ReleaseError, match=expected.replace("(", r"\(").replace("'", "'")):
        release(clone, model, source, target)
    assert git(clone, "rev-parse", "HEAD") == before and git(clone, "status", "--porcelain") == ""


def test_the_cli_verb_reports_errors_and_exit_codes(clone: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    assert main(["release", "tiny-classifier", "--from", "development", "--to", "staging",
                 "--repo", str(clone)]) == 1
    assert "no deployment in environment 'staging'" in capsys.readouterr().err
    assert main(["release", "tiny-classifier", "--from", "development", "--to", "production",
                 "--repo", str(clone), "--branch", "promote"]) == 0
    out = capsys.readouterr().out
    assert "release tiny-classifier: development -> production" in out and "on branch promote" in out
    assert git(clone, "rev-parse", "--abbrev-ref", "HEAD") == "promote"
    # Released again: production already runs what development runs.
    assert main(["release", "tiny-classifier", "--from", "development", "--to", "production",
                 "--repo", str(clone)]) == 1
    assert "nothing to release" in capsys.readouterr().err
    assert main(["release", "x", "--from", "a", "--to", "b", "--repo", str(clone / "missing")]) == 2


def test_a_dirty_file_is_not_overwritten(clone: Path) -> None:
    path = clone / "models" / "tiny-classifier.yaml"
    path.write_text(path.read_text() + "# my edit\n")
    with pytest.raises(ReleaseError, match="uncommitted changes"):
        release(clone, "tiny-classifier", "development", "production")
    assert path.read_text().endswith("# my edit\n")


def test_edit_adds_and_removes_keys_in_block_mappings() -> None:
    text = textwrap.dedent("""\
        spec:
          deployments:
            - environment: production
              replicas: 2  # two
              runtime:
                type: custom
                image: "x:1"
                args: |
                  a literal
                  block
            # after
        """)
    edited = edit_deployment(text, 1, ("spec", "deployments", 0),
                             {"origin": {"file": {"sha256": "sha256:" + OLD}}, "runtime": None})
    data = yaml.safe_load(edited)
    assert data["spec"]["deployments"][0] == {"environment": "production", "replicas": 2,
                                              "origin": {"file": {"sha256": "sha256:" + OLD}}}
    assert "  replicas: 2  # two\n" in edited and edited.endswith("    # after\n")


def test_an_edit_that_would_change_what_shares_an_anchor_is_refused(clone: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    (clone / "environments.yaml").write_text(ENVIRONMENTS + "---\napiVersion: modelfleet.dev/v1alpha1\n"
                                             "kind: Environment\nmetadata: {name: staging}\n")
    _commit(clone, "shared", textwrap.dedent("""\
        apiVersion: modelfleet.dev/v1alpha1
        kind: Model
        metadata: {name: shared}
        spec:
          deployments:
            - environment: production
              runtime:
                type: custom
                image: "x:1"
                resources: &r
                  cpus: 1
            - environment: staging
              runtime: {type: custom, image: "x:1", resources: *r}
            - environment: development
              runtime:
                type: custom
                image: "x:2"
                resources:
                  cpus: 2
        """))
    before = (clone / "models" / "shared.yaml").read_text()
    with pytest.raises(ReleaseError, match="would change other parts of the file"):
        release(clone, "shared", "development", "production")
    assert (clone / "models" / "shared.yaml").read_text() == before


def test_only_the_lines_that_change_change() -> None:
    text = textwrap.dedent("""\
        spec:
          deployments:
            - environment: production
              runtime:
                type: torch   # the type
                env: {A: "1"}
                # resources as measured
                resources:
                  cpus: 1
                  memory: 1Gi  # enough
        """)
    edited = edit_deployment(text, 1, ("spec", "deployments", 0),
                             {"runtime": {"type": "torch", "env": {"A": "2"}, "resources": {"cpus": 1}}})
    assert edited == text.replace('{A: "1"}', "{A: '2'}").replace("          memory: 1Gi  # enough\n", "")
