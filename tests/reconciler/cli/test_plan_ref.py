"""`modelfleet plan --ref REF`: any ref of the remote repository, planned as the daemon plans a
review branch head (the daemon's mirror is not written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet.reconciler.cli.main import main
from tests.reconciler.daemon.test_review import branch, make_daemon, model, work  # noqa: F401 (fixture)


def config_file(tmp_path: Path, origin: Path) -> Path:
    path = tmp_path / "modelfleet.yaml"
    path.write_text(yaml.safe_dump({"repo": {"url": str(origin)}, "stateDir": str(tmp_path / "state"),
                                    "status": {"provider": "none"}, "api": {"listen": "127.0.0.1:18081"},
                                    "review": {"branches": ["review/*"]}}))
    return path


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip().startswith("{") else {}, captured.err


def test_plan_ref_plans_the_branch_head(tmp_path: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    head = branch(work, "review/x", {"models/new.yaml": model("new")})
    config = config_file(tmp_path, work)
    code, data, _ = plan_json(capsys, "--ref", "review/x", "--config", str(config), "--json")
    assert code == 0 and data["revision"] == head
    assert sorted(d["model"] for d in data["deployments"]) == ["echo", "new"]
    code, by_sha, _ = plan_json(capsys, "--ref", head, "--config", str(config), "--json", "--offline")
    assert code == 0 and by_sha["revision"] == head
    assert not (tmp_path / "state" / "repo.git").exists()  # the daemon's mirror is not made nor written


def test_plan_ref_matches_the_daemon_s_review_plan(tmp_path: Path, work: Path,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    head = branch(work, "review/x", {"models/new.yaml": model("new"), "models/echo.yaml": model("echo", replicas=2)})
    daemon, _ = make_daemon(tmp_path, work)
    try:
        daemon.reconcile("test")
        daemon.reviews.run_once()
        document = daemon.reviews.get(head)
    finally:
        daemon.close()
    assert document is not None
    code, data, _ = plan_json(capsys, "--ref", "review/x", "--config", str(config_file(tmp_path, work)), "--json",
                              "--explain")
    reviewed = document["plan"]
    assert code == 0
    for key in ("revision", "valid", "errors", "deployments", "actions", "held"):
        assert data[key] == reviewed[key], key


def test_plan_ref_of_a_broken_branch_exits_1(tmp_path: Path, work: Path,  # noqa: F811
                                             capsys: pytest.CaptureFixture[str]) -> None:
    branch(work, "review/broken", {"models/echo.yaml": "kind: Model\napiVersion: modelfleet.dev/v1alpha1\n"
                                                       "metadata: {name: echo}\nspec: {deploymentz: []}\n"})
    code, data, _ = plan_json(capsys, "--ref", "review/broken", "--config", str(config_file(tmp_path, work)),
                              "--json", "--offline")
    assert code == 1 and data["valid"] is False
    assert str(data["errors"][0]).startswith("models/echo.yaml:4: ")


def test_plan_ref_that_does_not_exist_exits_3_saying_so(tmp_path: Path, work: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = plan_json(capsys, "--ref", "review/nope", "--config", str(config_file(tmp_path, work)), "--json")
    assert code == 3
    assert "cannot fetch 'review/nope' from" in err
