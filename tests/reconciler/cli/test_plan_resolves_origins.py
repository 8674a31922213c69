"""`modelfleet plan` (not --offline) resolves a HuggingFace revision to the commit it would deploy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modelfleet.reconciler.cli.main import main
from tests.reconciler.artifacts.hub_standin import FAKE_COMMIT, HubStandin, minilm_repos

API = "modelfleet.dev/v1alpha1"


def write_repo(root: Path, revision: str) -> None:
    root.mkdir()
    (root / "env.yaml").write_text(yaml.safe_dump({"apiVersion": API, "kind": "Environment",
                                                   "metadata": {"name": "production"}}))
    (root / "m.yaml").write_text(yaml.safe_dump({"apiVersion": API, "kind": "Model", "metadata": {"name": "emb"},
                                                 "spec": {"deployments": [{"environment": "production", "origin": {
                                                     "huggingface": {"model": "sentence-transformers/all-MiniLM-L6-v2",
                                                                     "revision": revision}}}]}}))


@pytest.mark.parametrize(("revision", "ok"), [("main", True), ("v1.0", True), ("no-such-branch", False)])
def test_plan_shows_the_commit_a_revision_resolves_to(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      revision: str, ok: bool) -> None:
    repos, _ = minilm_repos()
    with HubStandin(repos) as hub:
        write_repo(tmp_path / "repo", revision)
        config = tmp_path / "modelfleet.yaml"
        config.write_text(yaml.safe_dump({"stateDir": str(tmp_path / "state"), "pool": {"hosts": []},
                                          "integrations": {"huggingface": {"endpoint": hub.url}}}))
        code = main(["plan", str(tmp_path / "repo"), "--config", str(config), "--json"])
    out = json.loads(capsys.readouterr().out)
    deployment = out["deployments"][0]
    if ok:
        assert code == 0
        assert deployment["origin"]["huggingface"]["commit"] == FAKE_COMMIT
        assert "embeddings" in deployment["runtime"]["reason"]  # suggested from the Hub's metadata
    else:
        assert code == 1
        assert deployment["errors"] and "m.yaml:" in deployment["errors"][0]
        assert "no-such-branch" in deployment["errors"][0]
