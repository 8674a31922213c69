"""`modelfleet schema` (the manifests' JSON Schema for editors), and `plan --explain` naming the runtime
suggested for a runtime block without a type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelfleet.reconciler.cli.main import main
from modelfleet.state.schema import SCHEMA_PATH, render_manifest_schema

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "state" / "fixtures"
CONFIG = ROOT / "examples-repo" / "modelfleet.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_schema_prints_the_checked_in_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "schema")
    assert (code, err) == (0, "")
    assert out == render_manifest_schema() == (ROOT / SCHEMA_PATH).read_text(encoding="utf-8")


def test_schema_output_writes_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "modelfleet.schema.json"
    code, out, _ = run(capsys, "schema", "--output", str(target))
    assert (code, out) == (0, "")
    assert target.read_text(encoding="utf-8") == render_manifest_schema()


def test_schema_to_an_unwritable_place_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "schema", "--output", str(tmp_path / "no" / "such" / "dir" / "s.json"))
    assert code == 2 and "cannot write" in err and "No such file or directory" in err


def test_schema_imports_only_the_pure_core_and_pydantic() -> None:
    # The command generates the schema from the models alone: no Docker, Git, HTTP or jsonschema.
    probe = ("import json, sys; from modelfleet.reconciler.cli.main import build_parser, main; build_parser(); "
             "before = set(sys.modules); main(['schema', '--output', '/dev/null']); "
             "print(json.dumps(sorted(set(sys.modules) - before)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    imported = json.loads(done.stdout)
    assert "modelfleet.state.schema" in imported
    assert [m for m in imported if not m.startswith(("modelfleet.state.", "pydantic", "annotated_types"))] == []


def test_plan_explain_names_the_runtime_suggested_for_a_runtime_without_type(
        capsys: pytest.CaptureFixture[str]) -> None:
    repo = FIXTURES / "runtime-type-omitted-resources-only-suggests-torch-from-mar"
    code, out, err = run(capsys, "plan", str(repo), "--config", str(CONFIG), "--offline", "--explain")
    assert code == 0, err
    assert ("m/production: runtime torch (origin is a model archive (.mar): TorchServe-compatible torch runtime)"
            in out)
    assert "torch (2 cpu, 3Gi)" in out  # the block's resources apply to the suggested runtime
