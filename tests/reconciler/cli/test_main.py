"""The `modelfleet` CLI on a sample repo: `validate` and `plan`, exit codes, JSON shape, messages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelfleet.reconciler.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples-repo"
CONFIG = EXAMPLES / "modelfleet.yaml"
API = "apiVersion: modelfleet.dev/v1alpha1"
FILE_LINE = re.compile(r"^(?P<file>[\w./-]+\.ya?ml):(?P<line>\d+): ", re.MULTILINE)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors, and config errors, leave through SystemExit
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def bad_repo(tmp_path: Path) -> Path:
    """A copy of the examples with three mistakes in three files."""
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES, repo)
    (repo / "models" / "echo.yaml").write_text(
        (EXAMPLES / "models" / "echo.yaml").read_text().replace("replicas: 2", "replica: 2"))
    (repo / "environments" / "staging.yaml").write_text(
        f"{API}\nkind: Environment\nmetadata: {{name: staging}}\nspec:\n  policies: [eu-onyl]\n")
    (repo / "models" / "broken.yaml").write_text(f"{API}\nkind: Model\nmetadata: {{name: broken\n")
    return repo


# --- validate -----------------------------------------------------------------------------------


def test_validate_examples_repo(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", str(EXAMPLES))
    assert code == 0, err
    assert "valid (2 environments, 5 policies, 3 models, 6 deployments)" in out
    assert err == ""


def test_validate_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", str(EXAMPLES), "--json")
    assert code == 0
    assert json.loads(out) == {"valid": True, "errors": []}


def test_validate_bad_repo_reports_every_error_with_file_and_line(
        capsys: pytest.CaptureFixture[str], bad_repo: Path) -> None:
    code, out, err = run(capsys, "validate", str(bad_repo))
    assert code == 1
    located = {(m["file"], int(m["line"])) for m in FILE_LINE.finditer(err)}
    assert located == {("models/echo.yaml", 12), ("environments/staging.yaml", 5), ("models/broken.yaml", 4)}
    assert "models/echo.yaml:12: spec.deployments[0].replica: unknown field 'replica' (did you mean 'replicas'?)" \
        in err
    assert "environments/staging.yaml:5: spec.policies[0]: unknown policy 'eu-onyl' (did you mean 'eu-only'?)" in err
    assert "3 error(s) in" in err
    assert "valid (" not in out


def test_validate_json_bad_repo(capsys: pytest.CaptureFixture[str], bad_repo: Path) -> None:
    code, out, _ = run(capsys, "validate", str(bad_repo), "--json")
    assert code == 1
    data = json.loads(out)
    assert data["valid"] is False
    assert [(e["file"], e["line"], e["field"]) for e in data["errors"]] == [
        ("environments/staging.yaml", 5, "spec.policies[0]"),
        ("models/broken.yaml", 4, ""),
        ("models/echo.yaml", 12, "spec.deployments[0].replica"),
    ]
    assert all(e["text"].startswith(f"{e['file']}:{e['line']}: ") for e in data["errors"])


def test_validate_reports_a_flavor_the_policies_do_not_allow(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES, repo)
    minilm = repo / "models" / "minilm.yaml"
    minilm.write_text(minilm.read_text().replace("flavors: [intel-sapphire-rapids]",
                                                 "flavors: [intel-sapphire-rapids, gpu-a100]"))
    expected = ('models/minilm.yaml:12: spec.deployments[0].flavors[1]: flavor "gpu-a100" is not allowed by '
                'policies of environment "production" (allowed: amd-genoa, intel-sapphire-rapids)')
    code, _, err = run(capsys, "validate", str(repo))
    assert code == 1 and expected in err
    code, out, _ = run(capsys, "plan", str(repo), "--config", str(CONFIG), "--offline", "--json")
    assert code == 1 and json.loads(out)["errors"] == [expected]


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_missing_repo_directory_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 command: str) -> None:
    extra = ["--config", str(CONFIG), "--offline"] if command == "plan" else []
    code, out, err = run(capsys, command, str(tmp_path / "nope"), *extra)
    assert code == 2
    assert "not a directory" in err and out == ""


def test_unknown_command_and_missing_option_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "frobnicate")[0] == 2
    code, _, err = run(capsys, "plan", str(EXAMPLES))  # --config is required
    assert code == 2 and "--config" in err


# --- plan ---------------------------------------------------------------------------------------


def test_plan_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", str(EXAMPLES), "--config", str(CONFIG), "--offline", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert isinstance(plan["revision"], str) and plan["revision"]
    assert plan["valid"] is True and plan["errors"] == []
    deployments = {(d["model"], d["environment"]): d for d in plan["deployments"]}
    assert set(deployments) == {("echo", "production"), ("echo", "development"), ("minilm", "production"),
                                ("minilm", "development"), ("tiny-classifier", "production"),
                                ("tiny-classifier", "development")}
    for d in plan["deployments"]:
        assert {"model", "environment", "enabled", "eligible_hosts", "hosts", "errors"} <= set(d)
        assert isinstance(d["enabled"], bool) and d["errors"] == []
        assert set(d["hosts"]) <= set(d["eligible_hosts"])
        assert "excluded_hosts" not in d  # only with --explain
    # Policies: production is EU-only with modern CPUs; echo/development is France only.
    echo_prod = deployments[("echo", "production")]
    assert sorted(echo_prod["eligible_hosts"]) == ["fra-1", "par-1", "par-2"]
    assert len(echo_prod["hosts"]) == 2
    assert {h[:3] for h in echo_prod["hosts"]} == {"par", "fra"}  # spread across locations
    assert sorted(deployments[("echo", "development")]["eligible_hosts"]) == ["par-1", "par-2"]
    assert deployments[("minilm", "production")]["eligible_hosts"] == ["par-1", "fra-1"]
    minilm_dev = deployments[("minilm", "development")]
    assert minilm_dev["enabled"] is False and minilm_dev["hosts"] == []
    # Offline: an empty pool, so every placed replica is created.
    assert len(plan["actions"]) == 6
    for action in plan["actions"]:
        assert {"op", "model", "environment", "host"} <= set(action)
        assert action["op"] == "create"
        assert action["host"] in deployments[(action["model"], action["environment"])]["hosts"]


def test_plan_json_explain_lists_excluded_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", str(EXAMPLES), "--config", str(CONFIG), "--offline", "--json", "--explain")
    assert code == 0
    deployments = {(d["model"], d["environment"]): d for d in json.loads(out)["deployments"]}
    assert deployments[("minilm", "production")]["excluded_hosts"] == {
        "par-2": "does not offer requested flavor intel-sapphire-rapids",
        "iad-1": 'location virginia-1 (US, NA) not allowed by policy eu-only of environment "production"',
        "pdx-1": 'location oregon-1 (US, NA) not allowed by policy eu-only of environment "production"',
    }


def test_plan_explain_text_mentions_excluded_host_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", str(EXAMPLES), "--config", str(CONFIG), "--offline", "--explain")
    assert code == 0
    assert "echo/development: runtime custom (named in the manifest)" in out
    assert "✗ fra-1: location frankfurt-1 (DE, EU) not allowed by policy france of the deployment" in out
    assert '✗ iad-1: location virginia-1 (US, NA) not allowed by policy eu-only of environment "production"' in out
    assert "✗ par-2: does not offer requested flavor intel-sapphire-rapids" in out
    assert "6 action(s)" in out
    # Without --explain, no reasons.
    _, plain, _ = run(capsys, "plan", str(EXAMPLES), "--config", str(CONFIG), "--offline")
    assert "not allowed by policy" not in plain and "6 action(s)" in plain


def test_plan_explain_prints_names_from_the_config_verbatim(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    config = tmp_path / "modelfleet.yaml"
    config.write_text(CONFIG.read_text().replace("name: virginia-1", "name: 'rack[/1]'"))
    code, out, _ = run(capsys, "plan", str(EXAMPLES), "--config", str(config), "--offline", "--explain")
    assert code == 0
    assert "✗ iad-1: location rack[/1] (US, NA) not allowed by policy eu-only" in out


def test_plan_bad_repo_exits_1_with_errors_on_stderr(capsys: pytest.CaptureFixture[str], bad_repo: Path) -> None:
    code, out, err = run(capsys, "plan", str(bad_repo), "--config", str(CONFIG), "--offline")
    assert code == 1
    located = {(m["file"], int(m["line"])) for m in FILE_LINE.finditer(err)}
    assert located == {("models/echo.yaml", 12), ("environments/staging.yaml", 5), ("models/broken.yaml", 4)}
    assert "invalid" in out  # echo's deployments are shown as invalid in the table


def test_plan_bad_repo_json(capsys: pytest.CaptureFixture[str], bad_repo: Path) -> None:
    code, out, _ = run(capsys, "plan", str(bad_repo), "--config", str(CONFIG), "--offline", "--json")
    assert code == 1
    plan = json.loads(out)
    assert plan["valid"] is False and len(plan["errors"]) == 3
    deployments = {(d["model"], d["environment"]): d for d in plan["deployments"]}
    # The invalid deployment is frozen: reported with its error, nothing placed, no action.
    assert deployments[("echo", "production")]["hosts"] == []
    assert deployments[("echo", "production")]["errors"][0].startswith("models/echo.yaml:12: ")
    assert ("echo", "production") not in {(a["model"], a["environment"]) for a in plan["actions"]}
    # The rest of the repository still plans.
    assert deployments[("minilm", "production")]["hosts"] and deployments[("minilm", "production")]["errors"] == []


@pytest.mark.parametrize(("config", "line", "message"), [
    ("pool:\n  hosts: []\n  host: []\n", 3, "pool.host: unknown field 'host' (did you mean 'hosts'?)"),
    ("repo: {url: ., pollInterval: soon}\n", 1, "repo.pollInterval: 'soon' is not a duration"),
    ("pool:\n  hosts:\n    - name: par-1\n      location: {name: p, country: FR, continent: EU}\n"
     "      flavors: []\n      capacity: {cpus: 1, memory: 1Gi}\n", 5, "pool.hosts[0].flavors"),
    ("stateDir: [\n", 2, "invalid YAML"),
])
def test_plan_config_errors_exit_1_with_file_and_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      config: str, line: int, message: str) -> None:
    path = tmp_path / "modelfleet.yaml"
    path.write_text(config)
    code, out, err = run(capsys, "plan", str(EXAMPLES), "--config", str(path), "--offline", "--json")
    assert code == 1
    assert f"{path}:{line}: " in err
    assert message in err
    assert out == ""


def test_plan_missing_config_file_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "plan", str(EXAMPLES), "--config", str(tmp_path / "none.yaml"), "--offline")
    assert code == 1 and "cannot read config" in err


# --- the installed entry point, once ------------------------------------------------------------


def test_console_script_as_a_subprocess() -> None:
    exe = Path(sys.executable).with_name("modelfleet")
    assert exe.exists(), f"{exe} missing: pip install -e ."
    valid = subprocess.run([str(exe), "validate", str(EXAMPLES)], capture_output=True, text=True, timeout=60)
    assert valid.returncode == 0, valid.stderr
    plan = subprocess.run([str(exe), "plan", str(EXAMPLES), "--config", str(CONFIG), "--offline", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert {a["op"] for a in json.loads(plan.stdout)["actions"]} == {"create"}
    missing = subprocess.run([str(exe), "validate", "/nonexistent/repo"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "not a directory" in missing.stderr
